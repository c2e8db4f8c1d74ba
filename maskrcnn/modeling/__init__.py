"""Model components: backbone, FPN, RPN, RoI heads."""
