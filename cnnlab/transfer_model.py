"""The transfer model: a pretrained conv base with a new head, the base frozen or its last blocks
unfrozen, and the same model rebuilt from a finished run's record."""
from __future__ import annotations

from torch import nn

from .backbones import build, for_extraction
from .preprocessing import Preprocessing


class Head(nn.Module):
    """The new classifier: Flatten -> Dense (the seed's) or global average pooling -> Dense.
    One output unit (sigmoid) for two classes, else one per class (softmax); with ``multi_label``
    (several labels per image) one per class always, each its own sigmoid."""

    def __init__(self, kind: str, channels: int, grid: int, classes: int, multi_label: bool = False):
        super().__init__()
        self.kind = kind
        inputs = channels * grid * grid if kind == "flatten" else channels
        self.linear = nn.Linear(inputs, 1 if classes == 2 and not multi_label else classes)

    def forward(self, x):
        if self.kind == "gap" and x.dim() == 4:
            x = x.mean((2, 3))
        return self.linear(x.flatten(1).float())


class TransferModel(nn.Module):
    """Conv base + new head. The base's batch-norm layers always run in inference mode (their
    statistics stay frozen), and while the base is frozen it runs wholly in inference mode."""

    def __init__(self, features: nn.Module, head: Head):
        super().__init__()
        self.features = features
        self.head = head
        self.base_frozen = True

    def forward(self, x):
        return self.head(self.features(x))

    def for_inference(self) -> TransferModel:
        """The same function for scoring, in fewer passes over memory: the base as
        ``backbones.for_extraction`` gives it (a folded copy of EfficientNet-Lite's), the head shared."""
        return TransferModel(for_extraction(self.features), self.head).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.base_frozen:
            self.features.eval()
        else:
            for m in self.features.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def freeze_base(model: TransferModel, blocks: list[nn.Module], unfreeze: int = 0) -> int:
    """Freezes the whole base, then unfreezes its last ``unfreeze`` blocks; returns how many
    blocks have trainable parameters."""
    for p in model.features.parameters():
        p.requires_grad_(False)
    for block in blocks[len(blocks) - unfreeze:] if unfreeze else []:
        for p in block.parameters():
            p.requires_grad_(True)
    model.base_frozen = unfreeze == 0
    return sum(any(p.requires_grad for p in b.parameters()) for b in blocks)


def build_from_config(config: dict) -> tuple[TransferModel, Preprocessing]:
    """A transfer run's model (architecture only: weights come from its model.pt) and preprocessing."""
    preprocessing = Preprocessing.from_dict(config["preprocessing"])
    built = build(config["backbone"], preprocessing.size)
    head = Head(config["head"], built.channels, built.grid, len(config["class_names"]), bool(config.get("multi_label")))
    return TransferModel(built.features, head), preprocessing
