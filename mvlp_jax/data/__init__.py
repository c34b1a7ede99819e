"""Input pipelines: records, transforms, LLM targets."""
