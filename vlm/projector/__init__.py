from vlm.projector.builder import build_projector

__all__ = ["build_projector"]
