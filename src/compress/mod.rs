//! JLCM weight compression and its baselines (RTN, k-means).
