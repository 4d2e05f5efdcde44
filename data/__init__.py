"""LightningDataModules for what the l2c trainers consume."""
