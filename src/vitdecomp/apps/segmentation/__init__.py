"""Zero-shot segmentation from decomposition maps, measured against the published baselines.

``metrics`` (pixel accuracy, mIoU, Chefer et al.'s mAP, ...), ``harness`` (datasets in, every
method run in one pass, reports out), ``attention`` (raw attention and rollout maps) and
``relevance`` (attention GradCAM and Chefer relevance, exact gradients on stock models).
"""
