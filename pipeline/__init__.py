"""Feature precomputation: dataset readers, region and global encoders, the Zarr store writer."""
