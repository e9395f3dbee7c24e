"""The ModernBERT family: its adapter and its remote-code modeling file."""
