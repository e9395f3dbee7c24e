"""Vision Transformers (ViT, DeiT): their adapter and the remote-code modeling file of their exports."""
