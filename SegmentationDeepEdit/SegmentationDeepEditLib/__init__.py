"""SegmentationDeepEditLib: the pure core of SegmentationDeepEdit.

It never imports slicer, qt, ctk or vtk. Physical points are LPS millimetres (ITK's
convention); numpy arrays taken from SimpleITK images are indexed [k, j, i].
"""

__version__ = "0.1.0"
