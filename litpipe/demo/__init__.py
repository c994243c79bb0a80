"""The OpenMoji demo on top of every stage: its dataset, its pretrained image tower and LiT's ablation on it.

Nothing in the core or a stage imports this room; it imports them.
"""
