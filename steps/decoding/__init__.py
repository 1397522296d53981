"""Beam search and the scorer-format files decoding writes."""
