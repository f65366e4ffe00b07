"""Evaluation: the paper's benchmark tasks, prompted with the authors' templates and scored as they scored."""
