"""Who sends what to whom (architecture.md §1-§3, §5): the client, the CompNode and AttnNode workers, per-step
routing, generation. Model math is called here, never written here.
"""
