"""Models: vision, audio and text encoders, projectors and the alignment model."""
