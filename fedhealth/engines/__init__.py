"""Engines that run a federation: Flower simulation (embedded) and deployment."""
