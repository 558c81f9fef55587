"""Quantized modules that replace nn.Linear / nn.Conv2d."""
