//! Free space, the plan's needs, and PVC expansion.
