"""The language-model runtime: model code (`llama`, `llama_quantized`), the generation engine
(`engine.LLMEngine`), KV-cache planning (`plan`) and the OpenAI-compatible server (`serve`)."""
