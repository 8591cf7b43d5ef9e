"""The training curve as Slicer table / plot nodes, fed by a run's events (:class:`RunState`).

One ``vtkMRMLTableNode`` per curve (columns ``epoch`` and the curve's label), one scatter
``vtkMRMLPlotSeriesNode`` per table, one ``vtkMRMLPlotChartNode`` holding them. The plot view
node for an embedded plot widget is made with a *parent layout node* before it enters the scene:
Slicer's layout manager builds a view widget for every plot view node without one
(``qMRMLLayoutViewFactory::onNodeAdded``), which would be a second, hidden plot widget.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import slicer
import vtk

from MedTuningLib.slicer_bridge.events import RunState

X_COLUMN = "epoch"


def curve_label(name: str) -> Optional[str]:
    """The label of a curve MedTuning plots (``train/loss``, ``validate/dice/<region>``), else None."""
    if name == "train/loss":
        return "training loss"
    if name.startswith("validate/dice/"):
        return "Dice " + name.split("/", 2)[2]
    return None


def _fill_table(table_node: Any, xs: List[float], ys: List[float], y_name: str) -> None:
    """Replace the table's content with two double columns (no ``slicer.util``: no Qt needed)."""
    table = vtk.vtkTable()
    for column_name, values in ((X_COLUMN, xs), (y_name, ys)):
        column = vtk.vtkDoubleArray()
        column.SetName(column_name)
        column.SetNumberOfValues(len(values))
        for i, v in enumerate(values):
            column.SetValue(i, float(v))
        table.AddColumn(column)
    table_node.SetAndObserveTable(table)


class CurveNodes:
    """Table, series and chart nodes of one training's curves in ``scene``."""

    def __init__(self, scene: Any, title: str = "MedTuning training") -> None:
        self.scene = scene
        self.title = title
        self.chart: Any = None
        self.tables: Dict[str, Any] = {}
        self.series: Dict[str, Any] = {}

    def update(self, state: RunState) -> Any:
        """Bring the nodes up to date with ``state.curves``; returns the chart node."""
        if self.chart is None or not self.scene.IsNodePresent(self.chart):
            self.chart = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", self.title)
            self.chart.SetXAxisTitle(X_COLUMN)
            self.chart.SetYAxisTitle("loss / Dice")
            self.tables.clear()
            self.series.clear()
        for name in state.curve_names():
            label = curve_label(name)
            if label is None:
                continue
            points = state.curves[name]
            table = self.tables.get(name)
            if table is None or not self.scene.IsNodePresent(table):
                table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"MedTuning {label}")
                self.tables[name] = table
            _fill_table(table, [p.x for p in points], [p.value for p in points], label)
            if name not in self.series:
                series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", label)
                series.SetAndObserveTableNodeID(table.GetID())
                series.SetXColumnName(X_COLUMN)
                series.SetYColumnName(label)
                series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
                series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
                series.SetUniqueColor()
                self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
                self.series[name] = series
        return self.chart

    def remove(self) -> None:
        """Take the nodes out of the scene (a new training starts a new curve)."""
        for node in [*self.series.values(), *self.tables.values(), self.chart]:
            if node is not None and self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
        self.chart = None
        self.tables.clear()
        self.series.clear()


def embedded_plot_view_node(scene: Any, owner: Any, singleton_tag: str = "MedTuningCurves") -> Any:
    """The plot view node of an embedded plot widget, owned by ``owner`` (a node in the scene).

    The parent layout node is set before the node is added, so Slicer's main layout never builds a
    widget for it; an existing singleton without a parent gets it too.
    """
    view = scene.GetSingletonNode(singleton_tag, "vtkMRMLPlotViewNode")
    if view is None:
        view = slicer.vtkMRMLPlotViewNode()
        view.SetSingletonTag(singleton_tag)
        view.SetName(singleton_tag)
        view.SetLayoutName(singleton_tag)
        view.SetAndObserveParentLayoutNodeID(owner.GetID())
        view = scene.AddNode(view)
    elif view.GetParentLayoutNode() is None:
        view.SetAndObserveParentLayoutNodeID(owner.GetID())
    return view
