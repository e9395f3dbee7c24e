"""The Llama family (llama, mistral, qwen2, qwen3): its adapter and its remote-code modeling file."""
