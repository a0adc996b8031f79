"""Training every trained part (head, backbone pretraining), inference and the masks it writes."""
