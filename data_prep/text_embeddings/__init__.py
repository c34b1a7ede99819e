"""The offline LLM text-embedding job: report sources, model loading, record schema, shard planning."""
