"""ComfyUI driven through its HTTP API and websocket.

A job becomes an API-format graph: ``txt2img``, ``img2img`` and ``txt2vid`` through the versioned
templates of :mod:`sdagent.backends.workflows`, ``workflow`` jobs as the caller's own graph with the
job's explicit fields written into it (rules in :meth:`ComfyUIBackend.generate`). The graph is
queued with ``POST /prompt``, followed on ``/ws?clientId=`` and its files read from ``/view``.

Facts this adapter relies on (comfyanonymous/ComfyUI ``server.py``, ``execution.py``, ``main.py``,
``nodes.py``; the same shapes as :mod:`sdagent.sim.comfyui`):

* ``POST /prompt`` validates the graph at once: 400 ``{error, node_errors}`` when no output node
  validates; 200 ``{prompt_id, number, node_errors}`` otherwise, where ``node_errors`` lists outputs
  it accepted the prompt *without* (those are treated as a failure here, never silently dropped).
  A ``prompt_id`` sent in the body is used by current versions, so the agent knows the id even when
  the answer is lost.
* Messages for a prompt go to the websocket of its ``client_id``: ``execution_start``,
  ``execution_cached``, ``executing {node}``, ``progress {value, max}``, ``executed``, then
  ``execution_success`` / ``execution_error`` / ``execution_interrupted`` and ``executing`` with
  ``node: null``. The history entry is written between the last two, so its fetch is retried briefly.
* ``GET /history/{prompt_id}`` is empty until the prompt ended; then ``status {status_str,
  completed, messages}`` tells success, error (``execution_error`` in the messages) or interruption.
  The full ``/history`` grows without bound and is never read.
* ``POST /interrupt`` sets a flag the samplers check between steps; current versions take a
  ``prompt_id`` so only that prompt is stopped. The flag is cleared when the next prompt starts, so
  an interrupt that lands before its prompt runs is lost: a pending prompt is deleted from the queue
  instead (``POST /queue {delete}``) and the interrupt is repeated until the prompt is gone.
* Checkpoints are loaded by the graph (``CheckpointLoaderSimple``) and kept in ComfyUI's cache, so
  there is no "current model" to switch: see :meth:`ComfyUIBackend.switch_model`.
"""

from sdagent.backends.comfyui.backend import ComfyUIBackend

__all__ = ["ComfyUIBackend"]
