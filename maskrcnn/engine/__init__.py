"""Running a model over data: COCO evaluation (``evaluate.py``), prediction on image files (``predict.py``),
and the training loop with its checkpoints and distributed helpers."""
