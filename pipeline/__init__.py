"""Ray Data batch pipelines over Splinter: recurring-span mining and bulk QA extraction."""
