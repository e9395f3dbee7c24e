"""The DeBERTa-v2 / v3 family (deberta-v2): its adapter and its remote-code modeling file."""
