"""S3: a job's inputs, its outputs and their links, and how S3 errors are classed."""
