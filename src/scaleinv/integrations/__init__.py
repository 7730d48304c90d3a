"""Bridges to other libraries: checkpoints of other optimizers (:mod:`.checkpoints`) and timm's
optimizer factory (:mod:`.timm`). Nothing here is imported by ``import scaleinv``."""
