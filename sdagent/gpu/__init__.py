"""NVML behind one seam, for the WebUI supervisor and the metrics."""
