"""Placeholder until the cross_entropy op lands (being written now)."""
def FusedCrossEntropyLoss(*a, **k):
    raise NotImplementedError("FusedCrossEntropyLoss is not written yet")

def cross_entropy(*a, **k):
    raise NotImplementedError("cross_entropy is not written yet")

