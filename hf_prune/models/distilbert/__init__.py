"""The DistilBERT family: its adapter and its remote-code modeling file."""
