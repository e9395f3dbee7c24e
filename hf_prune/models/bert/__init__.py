"""The BERT family (bert, roberta, xlm-roberta, electra): its adapter and its remote-code modeling file."""
