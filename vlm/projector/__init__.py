from vlm.projector.builder import build_projector, projected_num_tokens

__all__ = ["build_projector", "projected_num_tokens"]
