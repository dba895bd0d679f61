"""Sharing task vectors through huggingface_hub (any endpoint), and the embedded Hub server."""
