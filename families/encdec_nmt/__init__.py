"""encdec family plugin: fairseq transformer NMT checkpoints and transformers FSMT folders."""
