"""`rshard audit`: attacks against what one node sees, with the real model, and their reports (docs/audit.md)."""
