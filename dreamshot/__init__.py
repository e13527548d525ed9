"""DreamShot: personalized storyboard generation with a LoRA-tuned Wan2.1 video diffusion transformer."""

__version__ = "0.1.0"
