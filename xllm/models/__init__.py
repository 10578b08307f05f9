"""Model definitions and the registry (config.json "architectures" -> class).

- ``xllm.models.config``    ModelConfig, parsed from config.json
- ``xllm.models.registry``  get_model_class, SUPPORTED_ARCHITECTURES
- ``xllm.models.llama``     the Llama family (Llama, Mistral, Qwen2, Qwen3)
"""
