"""Automatic captions for car folders (``python -m clipdiff.label``): colour from segmented paint, body type
from silhouettes over posed views, a report against ground truth when there is one."""
