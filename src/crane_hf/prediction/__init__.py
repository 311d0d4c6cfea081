"""Batch prediction at scale: image sources read in DataLoader workers (`image_stream`), per-process result shards
appended as images are scored and merged into the tables (`result_shards`), and the run itself, split over
accelerate processes and resumable (`sharded_prediction`). `crane-hf predict` is its command."""
