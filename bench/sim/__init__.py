"""The scheduling simulator's workload and fleet model."""
