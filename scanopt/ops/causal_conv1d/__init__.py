"""Causal depthwise conv1d (causal-conv1d drop-in)."""
