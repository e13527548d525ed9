"""Storyboard generation: story files, the guided sampler, output folders, contact sheets, storyboard to video."""
