"""The dense prediction tasks and their output channels."""

TASKS = {
    "semseg": "semantic segmentation: per-class logits",
    "depth": "metric depth in metres, one channel",
    "normals": "surface normals, three channels (unit length after normalisation)",
    "edges": "edge logits, one channel",
}

DEFAULT_CLASSES = 8  # classes of the synthetic scene set


def task_channels(task: str, num_classes: int = DEFAULT_CLASSES) -> int:
    return {"semseg": num_classes, "depth": 1, "normals": 3, "edges": 1}[task]
