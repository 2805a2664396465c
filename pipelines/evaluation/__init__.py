"""Evaluation of generated images: FID, CLIP score and the demo attribute probe."""
