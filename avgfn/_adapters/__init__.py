"""Adapters at the edge: nn.Module and torch.optim drivers over the pure averagers."""
