"""Small models built on torch_flashops ops (the demo of the main job)."""
