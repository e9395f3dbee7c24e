"""What leaves a run: exports that load anywhere (safetensors, config, remote code), the pruning report, the model
card, ONNX and int8 files, and the measurements of the deployed forms."""
