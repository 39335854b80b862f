"""The vllm backend: vLLM as the engine, with each request's HPR edit inside its forward."""
