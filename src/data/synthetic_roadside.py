"""Synthetic roadside-camera detection data with a strong perspective density gradient.

A camera on a pole beside the road looks across and along it; the road recedes to a vanishing
point in the UPPER LEFT of the image. Objects (car, truck, bus, pedestrian, cyclist: each a few
coloured 3D boxes with its own shape and colour) are placed uniformly on the road plane in world
metres and projected with a pinhole model, so far objects are small and crowded near the vanishing
point and near objects are large and sparse at the bottom, as in DAIR-V2X-I roadside images.

World frame: X along the road (away from the camera), Y to the left, Z up; the ground is Z = 0.
Camera frame: x right, y down, z forward (optical axis). Objects are painted far to near; a label
map painted in the same order is the z-buffer that gives each object's visible pixels. Boxes
cover the visible part; tiny (a visible side < ``crowd_min_side`` px) or mostly hidden (visible
fraction < ``crowd_min_visible``) objects are written with ``iscrowd = 1``.

Everything is deterministic from the seed: image i of a split uses
``numpy.random.default_rng([seed, split_code, i])``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [
    {"id": 1, "name": "car", "supercategory": "vehicle"},
    {"id": 2, "name": "truck", "supercategory": "vehicle"},
    {"id": 3, "name": "bus", "supercategory": "vehicle"},
    {"id": 4, "name": "pedestrian", "supercategory": "person"},
    {"id": 5, "name": "cyclist", "supercategory": "person"},
]
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
SMALL_AREA, LARGE_AREA = 32 ** 2, 96 ** 2  # plain COCO thresholds, in image pixels


@dataclass(frozen=True)
class ObjectClass:
    """Class template: size (length, width, height) in metres, sampling weight, base RGB colour."""
    name: str
    category_id: int
    size_m: Tuple[float, float, float]
    weight: float
    colour: Tuple[int, int, int]
    on_road_only: bool


OBJECT_CLASSES: Tuple[ObjectClass, ...] = (
    ObjectClass("car", 1, (4.5, 1.85, 1.5), 0.45, (196, 38, 36), True),
    ObjectClass("truck", 2, (8.0, 2.5, 3.3), 0.12, (214, 120, 30), True),
    ObjectClass("bus", 3, (11.5, 2.6, 3.2), 0.08, (235, 205, 40), True),
    ObjectClass("pedestrian", 4, (0.55, 0.55, 1.75), 0.20, (170, 50, 190), False),
    ObjectClass("cyclist", 5, (1.8, 0.6, 1.75), 0.15, (40, 170, 70), False),
)


@dataclass(frozen=True)
class RoadsideCamera:
    """Pinhole camera on a pole at world (0, lateral_m, height_m), yawed right of the road direction
    by ``yaw_deg`` and pitched down by ``pitch_deg``; ``focal_px`` in pixels, principal point at the
    image centre. The road direction's vanishing point is at
    (cx - f tan(yaw) / cos(pitch), cy - f tan(pitch)): upper left for positive yaw and pitch."""
    width: int
    height: int
    focal_px: float
    height_m: float
    pitch_deg: float
    yaw_deg: float
    lateral_m: float

    @classmethod
    def for_image(cls, width: int, height: int) -> "RoadsideCamera":
        """The default roadside geometry, scaled to the image (focal length proportional to width)."""
        return cls(width=width, height=height, focal_px=0.75 * width, height_m=7.0,
                   pitch_deg=14.0, yaw_deg=24.0, lateral_m=9.0)

    @property
    def position(self) -> np.ndarray:
        return np.array([0.0, self.lateral_m, self.height_m])

    def rotation(self) -> np.ndarray:
        """[3, 3] world-to-camera rotation; rows are the camera x (right), y (down), z (forward) axes."""
        yaw, pitch = math.radians(self.yaw_deg), math.radians(self.pitch_deg)
        forward_h = np.array([math.cos(yaw), -math.sin(yaw), 0.0])
        up = np.array([0.0, 0.0, 1.0])
        right = np.cross(forward_h, up)
        forward = math.cos(pitch) * forward_h - math.sin(pitch) * up
        down = -(math.cos(pitch) * up + math.sin(pitch) * forward_h)
        return np.stack([right, down, forward])

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        """World points [..., 3] -> camera coordinates [..., 3]."""
        return (points - self.position) @ self.rotation().T

    def project(self, points_cam: np.ndarray) -> np.ndarray:
        """Camera points [..., 3] with z > 0 -> pixel coordinates [..., 2] (u right, v down)."""
        z = points_cam[..., 2:3]
        return self.focal_px * points_cam[..., :2] / z + np.array([self.width / 2.0, self.height / 2.0])

    def vanishing_point(self) -> Tuple[float, float]:
        """Pixel position of the road direction (+X) at infinity."""
        d = self.rotation() @ np.array([1.0, 0.0, 0.0])
        return tuple(self.project(d[None])[0])

    def horizon_row(self) -> float:
        return self.height / 2.0 - self.focal_px * math.tan(math.radians(self.pitch_deg))


@dataclass(frozen=True)
class SceneConfig:
    """Road layout (metres) and object sampling / crowd rules."""
    min_objects: int = 20
    max_objects: int = 40
    num_lanes: int = 4
    lane_width_m: float = 3.5
    sidewalk_width_m: float = 3.0
    min_distance_m: float = 4.0
    max_distance_m: float = 110.0
    crowd_min_side: float = 4.0
    crowd_min_visible: float = 0.3
    max_trials_per_object: int = 30

    @property
    def road_half_width(self) -> float:
        return self.num_lanes * self.lane_width_m / 2.0


# --------------------------------------------------------------------------- geometry helpers
# Box corners: index bits (x, y, z) -> corner (+-l/2, +-w/2, z0 / z1).
_CORNER_SIGNS = np.array([[(i >> 0) & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=np.float64)
# Faces as corner index quads (in cyclic order) with outward normals in the object frame.
_FACES = (
    ((0, 2, 6, 4), (-1.0, 0.0, 0.0)), ((1, 3, 7, 5), (1.0, 0.0, 0.0)),
    ((0, 1, 5, 4), (0.0, -1.0, 0.0)), ((2, 3, 7, 6), (0.0, 1.0, 0.0)),
    ((0, 1, 3, 2), (0.0, 0.0, -1.0)), ((4, 5, 7, 6), (0.0, 0.0, 1.0)),
)


@dataclass
class Part:
    """An axis-aligned box in the object frame: x in [x0, x1] (length), y in [y0, y1], z in [z0, z1]."""
    x0: float
    x1: float
    y0: float
    y1: float
    z0: float
    z1: float
    colour: Tuple[int, int, int]


@dataclass
class PlacedObject:
    cls: ObjectClass
    x: float
    y: float
    heading: float
    size: Tuple[float, float, float]
    colour: Tuple[int, int, int]


def _shade(colour: Sequence[int], factor: float) -> Tuple[int, int, int]:
    return tuple(int(max(0, min(255, round(c * factor)))) for c in colour)


def object_parts(obj: PlacedObject) -> List[Part]:
    """The coloured boxes that make up one object (class-specific shape), in the object frame."""
    length, width, height = obj.size
    c = obj.colour
    hl, hw = length / 2.0, width / 2.0
    dark = (30, 30, 34)
    glass = (70, 90, 110)
    name = obj.cls.name
    # Parts are stacked (each rests on or beside the ones below), see ``object_faces`` for the order.
    if name == "car":
        return [Part(-0.42 * length, 0.42 * length, -hw - 0.01, hw + 0.01, 0.0, 0.3 * height, dark),
                Part(-hl, hl, -hw, hw, 0.3 * height, 0.62 * height, c),
                Part(-0.3 * length, 0.22 * length, -0.44 * width, 0.44 * width, 0.62 * height, height, glass)]
    if name == "truck":
        return [Part(-0.45 * length, hl - 0.3, -hw - 0.01, hw + 0.01, 0.0, 0.45, dark),
                Part(-hl, 0.22 * length, -hw, hw, 0.45, height, c),
                Part(0.25 * length, hl, -0.47 * width, 0.47 * width, 0.45, 0.8 * height, (225, 225, 230)),
                Part(hl, hl + 0.02, -0.4 * width, 0.4 * width, 0.55 * height, 0.75 * height, glass)]
    if name == "bus":
        return [Part(-0.4 * length, 0.4 * length, -hw - 0.01, hw + 0.01, 0.0, 0.4, dark),
                Part(-hl, hl, -hw, hw, 0.4, 0.55 * height, c),
                Part(-hl, hl, -hw, hw, 0.55 * height, 0.82 * height, glass),
                Part(-hl, hl, -hw, hw, 0.82 * height, height, c)]
    if name == "pedestrian":
        return [Part(-0.12, 0.12, -0.18, 0.18, 0.0, 0.47 * height, (40, 45, 90)),
                Part(-0.15, 0.15, -hw, hw, 0.47 * height, 0.84 * height, c),
                Part(-0.1, 0.1, -0.1, 0.1, 0.84 * height, height, (225, 180, 150))]
    # cyclist: bicycle (dark frame and wheels) with a rider on top
    return [Part(-hl, hl, -0.05, 0.05, 0.0, 0.62, dark),
            Part(-0.2, 0.25, -0.2, 0.2, 0.62, 0.82 * height, c),
            Part(-0.1, 0.1, -0.1, 0.1, 0.82 * height, height, (225, 180, 150))]


def _part_corners(part: Part) -> np.ndarray:
    """[8, 3] corners of a part in the object frame (corner bit order of ``_CORNER_SIGNS``)."""
    lo = np.array([part.x0, part.y0, part.z0])
    hi = np.array([part.x1, part.y1, part.z1])
    return lo + _CORNER_SIGNS * (hi - lo)


def _object_to_world(obj: PlacedObject, points: np.ndarray) -> np.ndarray:
    """Rotate object-frame points [..., 3] by the heading about Z and move to (x, y, 0)."""
    cos, sin = math.cos(obj.heading), math.sin(obj.heading)
    rot = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    return points @ rot.T + np.array([obj.x, obj.y, 0.0])


def object_faces(obj: PlacedObject, camera: RoadsideCamera) -> List[Tuple[List[Tuple[float, float]], Tuple[int, int, int]]]:
    """Front-facing faces of every part as (pixel polygon, shaded colour), in drawing order.

    Back-face culling leaves non-overlapping faces per (convex) part. The camera is above every
    object and upper parts sit on lower ones, so parts are painted bottom to top (by ``z0``) and,
    at the same height, far to near.
    """
    parts = object_parts(obj)
    corners_obj = np.stack([_part_corners(p) for p in parts])  # [P, 8, 3]
    corners_world = _object_to_world(obj, corners_obj)
    corners_cam = camera.to_camera(corners_world)
    depth = corners_cam[..., 2].mean(axis=1)  # [P]
    order = sorted(range(len(parts)), key=lambda i: (round(parts[i].z0, 4), -depth[i]))
    parts = [parts[i] for i in order]
    corners_world, corners_cam = corners_world[order], corners_cam[order]
    pixels = camera.project(corners_cam)  # [P, 8, 2]
    cos, sin = math.cos(obj.heading), math.sin(obj.heading)
    cam_pos = camera.position
    light = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    faces = []
    for p, part in enumerate(parts):
        for quad, normal in _FACES:
            n_world = np.array([cos * normal[0] - sin * normal[1], sin * normal[0] + cos * normal[1], normal[2]])
            centre = corners_world[p, list(quad)].mean(axis=0)
            if float(n_world @ (cam_pos - centre)) <= 0.0:
                continue
            shade = 0.55 + 0.45 * max(0.0, float(n_world @ light))
            polygon = [tuple(map(float, pixels[p, q])) for q in quad]
            faces.append((polygon, _shade(part.colour, shade)))
    return faces


def object_depth(obj: PlacedObject, camera: RoadsideCamera) -> float:
    """Camera-frame depth (z) of the object's centre, in metres."""
    return float(camera.to_camera(np.array([obj.x, obj.y, obj.size[2] / 2.0]))[2])


def _clip_polygon_front(points_cam: np.ndarray, z_min: float) -> np.ndarray:
    """Sutherland-Hodgman clip of a convex polygon [K, 3] (camera frame) to z >= z_min -> [M, 3]."""
    out = []
    k = len(points_cam)
    for i in range(k):
        a, b = points_cam[i], points_cam[(i + 1) % k]
        a_in, b_in = a[2] >= z_min, b[2] >= z_min
        if a_in:
            out.append(a)
        if a_in != b_in:
            t = (z_min - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out).reshape(-1, 3)


def _ground_polygon(camera: RoadsideCamera, x0: float, x1: float, y0: float, y1: float,
                    z_min: float = 0.5) -> List[Tuple[float, float]]:
    """Pixel polygon of the ground rectangle X in [x0, x1], Y in [y0, y1] (clipped in front of the camera)."""
    world = np.array([[x0, y0, 0.0], [x1, y0, 0.0], [x1, y1, 0.0], [x0, y1, 0.0]])
    cam = _clip_polygon_front(camera.to_camera(world), z_min)
    if len(cam) < 3:
        return []
    return [tuple(map(float, p)) for p in camera.project(cam)]


# --------------------------------------------------------------------------- scene sampling
def _footprint(obj: PlacedObject) -> Tuple[float, float, float, float]:
    """Axis-aligned world footprint (x0, x1, y0, y1) of an object, for overlap rejection."""
    length, width, _ = obj.size
    cos, sin = abs(math.cos(obj.heading)), abs(math.sin(obj.heading))
    hx = (length * cos + width * sin) / 2.0
    hy = (length * sin + width * cos) / 2.0
    return obj.x - hx, obj.x + hx, obj.y - hy, obj.y + hy


def sample_objects(rng: np.random.Generator, camera: RoadsideCamera, scene: SceneConfig,
                   num_objects: int) -> List[PlacedObject]:
    """Place up to ``num_objects`` objects uniformly on the road plane, non-overlapping in world,
    in front of the camera and with their ground centre inside the image."""
    weights = np.array([c.weight for c in OBJECT_CLASSES])
    weights = weights / weights.sum()
    half = scene.road_half_width
    placed: List[PlacedObject] = []
    footprints: List[Tuple[float, float, float, float]] = []
    for _ in range(num_objects):
        for _trial in range(scene.max_trials_per_object):
            cls = OBJECT_CLASSES[int(rng.choice(len(OBJECT_CLASSES), p=weights))]
            size = tuple(float(s) * float(rng.uniform(0.9, 1.1)) for s in cls.size_m)
            x = float(rng.uniform(scene.min_distance_m, scene.max_distance_m))
            if cls.on_road_only:
                y = float(rng.uniform(-half + size[1] / 2, half - size[1] / 2))
                heading = (0.0 if y < 0 else math.pi) + float(rng.normal(0.0, 0.03))
            else:
                edge = half + scene.sidewalk_width_m
                y = float(rng.uniform(-edge, edge))
                heading = float(rng.uniform(-math.pi, math.pi)) if cls.name == "pedestrian" else \
                    (0.0 if y < 0 else math.pi) + float(rng.normal(0.0, 0.1))
            jitter = rng.uniform(0.8, 1.15, size=3)
            colour = tuple(int(min(255, c * j)) for c, j in zip(cls.colour, jitter))
            obj = PlacedObject(cls=cls, x=x, y=y, heading=heading, size=size, colour=colour)
            fx0, fx1, fy0, fy1 = _footprint(obj)
            if any(fx0 < g1 + 0.5 and g0 < fx1 + 0.5 and fy0 < h1 + 0.3 and h0 < fy1 + 0.3
                   for g0, g1, h0, h1 in footprints):
                continue
            ground = np.array([[fx0, fy0, 0.0], [fx1, fy1, 0.0], [fx0, fy1, 0.0], [fx1, fy0, 0.0],
                               [x, y, size[2]]])
            cam = camera.to_camera(ground)
            if (cam[:, 2] < 1.0).any():
                continue
            u, v = camera.project(camera.to_camera(np.array([x, y, 0.0])))
            if not (0 <= u < camera.width and 0 <= v < camera.height):
                continue
            placed.append(obj)
            footprints.append((fx0, fx1, fy0, fy1))
            break
    return placed


# --------------------------------------------------------------------------- rendering
def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: Tuple[int, int]) -> np.ndarray:
    """Low-frequency noise [H, W] in about [-1, 1]: a coarse random grid upsampled bilinearly."""
    grid = rng.uniform(-1.0, 1.0, size=cells).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((width, height), Image.BILINEAR)
    return np.asarray(img)


def render_background(rng: np.random.Generator, camera: RoadsideCamera, scene: SceneConfig) -> Image.Image:
    """Sky, grass, sidewalks, asphalt road with lane markings, roadside clutter and texture."""
    w, h = camera.width, camera.height
    horizon = int(round(camera.horizon_row()))
    rows = np.arange(h, dtype=np.float32)[:, None, None]
    sky_top, sky_low = np.array([110, 150, 205], np.float32), np.array([200, 215, 230], np.float32)
    t = np.clip(rows / max(horizon, 1), 0.0, 1.0)
    base = np.broadcast_to(sky_top + t * (sky_low - sky_top), (h, w, 3)).copy()
    grass = np.array([96, 122, 70], np.float32) + rng.uniform(-10, 10, size=3)
    base[max(horizon, 0):] = grass
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)

    half = scene.road_half_width
    far = 3000.0
    side = scene.sidewalk_width_m
    for y0, y1 in ((half, half + side), (-half - side, -half)):
        poly = _ground_polygon(camera, -50.0, far, y0, y1)
        if poly:
            draw.polygon(poly, fill=(150, 148, 142))
    # clutter beyond the far side of the road: buildings and trees (never in front of road objects)
    for _ in range(int(rng.integers(10, 20))):
        x = float(rng.uniform(15.0, 250.0))
        y = float(rng.uniform(-half - side - 30.0, -half - side - 3.0))
        tree = bool(rng.random() < 0.5)
        size = (3.0, 3.0, float(rng.uniform(4, 8))) if tree else \
            (float(rng.uniform(8, 25)), float(rng.uniform(6, 12)), float(rng.uniform(6, 20)))
        colour = (50, 95 + int(rng.integers(0, 40)), 45) if tree else \
            tuple(int(v) for v in int(rng.integers(120, 190)) + rng.integers(-15, 16, 3))
        clutter = PlacedObject(cls=OBJECT_CLASSES[0], x=x, y=y, heading=0.0, size=size, colour=colour)
        corners = _object_to_world(clutter, _part_corners(Part(-size[0] / 2, size[0] / 2, -size[1] / 2, size[1] / 2,
                                                               0.0, size[2], colour)))
        if (camera.to_camera(corners)[:, 2] < 1.0).any():
            continue
        faces = []
        for quad, normal in _FACES:
            centre = corners[list(quad)].mean(axis=0)
            if float(np.array(normal) @ (camera.position - centre)) > 0:
                faces.append(([tuple(map(float, p)) for p in camera.project(camera.to_camera(corners[list(quad)]))],
                              _shade(colour, 1.0 if normal[2] > 0 else 0.8 if normal[0] else 0.65)))
        for poly, col in faces:
            draw.polygon(poly, fill=col)

    road = _ground_polygon(camera, -50.0, far, -half, half)
    if road:
        draw.polygon(road, fill=(84, 84, 88))
    # solid edge lines, dashed lane boundaries
    for y in (-half + 0.2, half - 0.2):
        poly = _ground_polygon(camera, -50.0, far, y - 0.08, y + 0.08)
        if poly:
            draw.polygon(poly, fill=(225, 225, 215))
    for lane in range(1, scene.num_lanes):
        y = -half + lane * scene.lane_width_m
        colour = (230, 200, 60) if lane == scene.num_lanes // 2 else (230, 230, 225)
        for x0 in np.arange(0.0, 220.0, 9.0):
            poly = _ground_polygon(camera, float(x0), float(x0) + 3.0, y - 0.08, y + 0.08)
            if poly:
                draw.polygon(poly, fill=colour)

    pixels = np.asarray(image).astype(np.float32)
    blotch = _smooth_noise(rng, h, w, (max(2, h // 24), max(2, w // 24)))
    pixels += 12.0 * blotch[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _visible_box(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel-edge box of a non-empty boolean mask [h, w]."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def draw_objects(image: Image.Image, camera: RoadsideCamera, objects: List[PlacedObject],
                 scene: SceneConfig) -> List[dict]:
    """Paint ``objects`` far to near onto ``image`` (in place) and annotate their visible parts.

    A label map painted with the same polygons in the same order is the z-buffer: object k's
    visible pixels are where it holds k. Returns one annotation per object with any visible
    pixel (ids not set): ``category_id``, ``bbox`` [x, y, w, h] of the visible pixels, ``area``
    (box area), ``iscrowd``, ``visible_fraction`` (visible / unoccluded in-image pixels),
    ``distance_m`` (ground distance from the camera), in painting order.
    """
    w, h = camera.width, camera.height
    objects = sorted(objects, key=lambda o: -object_depth(o, camera))  # far to near (painter's order)
    draw = ImageDraw.Draw(image)
    label_map = Image.new("I", (w, h), 0)
    label_draw = ImageDraw.Draw(label_map)
    own_counts, crops = [], []
    for k, obj in enumerate(objects, start=1):
        faces = object_faces(obj, camera)
        pts = np.array([p for poly, _ in faces for p in poly]).reshape(-1, 2)
        x0 = int(max(0, math.floor(pts[:, 0].min())))
        y0 = int(max(0, math.floor(pts[:, 1].min())))
        x1 = int(min(w, math.ceil(pts[:, 0].max()) + 1))
        y1 = int(min(h, math.ceil(pts[:, 1].max()) + 1))
        own = Image.new("L", (max(x1 - x0, 1), max(y1 - y0, 1)), 0)
        own_draw = ImageDraw.Draw(own)
        for poly, colour in faces:
            draw.polygon(poly, fill=colour)
            label_draw.polygon(poly, fill=k)
            own_draw.polygon([(px - x0, py - y0) for px, py in poly], fill=1)
        inside = x1 > x0 and y1 > y0
        own_counts.append(int(np.count_nonzero(np.asarray(own))) if inside else 0)
        crops.append((x0, y0, x1, y1))

    labels = np.asarray(label_map)
    annotations = []
    for k, (obj, own, (x0, y0, x1, y1)) in enumerate(zip(objects, own_counts, crops), start=1):
        if own == 0:
            continue
        mask = labels[y0:y1, x0:x1] == k
        visible = int(np.count_nonzero(mask))
        if visible == 0:
            continue
        bx0, by0, bx1, by1 = _visible_box(mask)
        bw, bh = bx1 - bx0, by1 - by0
        fraction = visible / own
        crowd = int(min(bw, bh) < scene.crowd_min_side or fraction < scene.crowd_min_visible)
        annotations.append({
            "category_id": obj.cls.category_id,
            "bbox": [float(x0 + bx0), float(y0 + by0), float(bw), float(bh)],
            "area": float(bw * bh),
            "iscrowd": crowd,
            "visible_fraction": round(fraction, 4),
            "distance_m": round(float(math.hypot(obj.x, obj.y - camera.lateral_m)), 2),
        })
    return annotations


def render_scene(rng: np.random.Generator, camera: RoadsideCamera, scene: SceneConfig):
    """Sample and render one image. Returns (uint8 array [H, W, 3], annotations of ``draw_objects``)."""
    num = int(rng.integers(scene.min_objects, scene.max_objects + 1))
    objects = sample_objects(rng, camera, scene, num)
    image = render_background(rng, camera, scene)
    annotations = draw_objects(image, camera, objects, scene)
    pixels = np.asarray(image).astype(np.float32)
    pixels += rng.normal(0.0, 4.0, size=pixels.shape).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8), annotations


# --------------------------------------------------------------------------- dataset writing
def _render_and_save(job) -> List[dict]:
    """Worker: render image i of a split from its own seed and save it; returns its annotations."""
    i, seed, split, camera, scene, img_dir, image_format = job
    rng = np.random.default_rng([seed, SPLIT_CODES[split], i])
    pixels, anns = render_scene(rng, camera, scene)
    path = os.path.join(img_dir, f"{i:06d}.{image_format}")
    if image_format == "jpg":
        Image.fromarray(pixels).save(path, quality=92)
    else:
        Image.fromarray(pixels).save(path)
    return anns


def generate_split(out_dir: str, split: str, num_images: int, seed: int, camera: RoadsideCamera,
                   scene: SceneConfig, image_format: str = "jpg", workers: int = 1) -> dict:
    """Render ``num_images`` images into ``out_dir/images/{split}`` and return the COCO dict.

    ``workers`` > 1 renders in that many processes. Image i always uses its own generator
    ``default_rng([seed, split_code, i])`` and results are collected in image order, so the output is
    the same for any number of workers.
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    img_dir = os.path.join(out_dir, "images", split)
    os.makedirs(img_dir, exist_ok=True)
    jobs = [(i, seed, split, camera, scene, img_dir, image_format) for i in range(num_images)]
    if workers > 1 and num_images > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(min(workers, num_images)) as pool:
            per_image = pool.map(_render_and_save, jobs, chunksize=max(1, num_images // (8 * workers)))
    else:
        per_image = [_render_and_save(job) for job in jobs]
    images, annotations = [], []
    for i, anns in enumerate(per_image):
        image_id = i + 1
        images.append({"id": image_id, "file_name": f"{i:06d}.{image_format}", "width": camera.width,
                       "height": camera.height})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    return {
        "info": {"description": f"synthetic roadside detection ({split})", "seed": seed,
                 "camera": asdict(camera), "vanishing_point": [round(v, 2) for v in camera.vanishing_point()]},
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }


def generate_dataset(out_dir: str, num_train: int = 48, num_val: int = 16, width: int = 640, height: int = 360,
                     seed: int = 0, min_objects: int = 20, max_objects: int = 40,
                     image_format: str = "jpg", workers: int = 1) -> Dict[str, dict]:
    """Write ``out_dir/images/{train,val}`` and ``out_dir/annotations/instances_{train,val}.json``.

    Returns the COCO dict of each split. Deterministic for a given seed and arguments, whatever
    ``workers`` (processes rendering in parallel).
    """
    if width < 64 or height < 64:
        raise ValueError(f"image size {width}x{height} is too small; use at least 64x64")
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    camera = RoadsideCamera.for_image(width, height)
    scene = SceneConfig(min_objects=min_objects, max_objects=max_objects)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    result = {}
    for split, n in (("train", num_train), ("val", num_val)):
        coco = generate_split(out_dir, split, n, seed, camera, scene, image_format, workers)
        with open(os.path.join(out_dir, "annotations", f"instances_{split}.json"), "w", encoding="utf-8") as f:
            json.dump(coco, f)
        result[split] = coco
    return result


def ensure_dataset(out_dir: str, num_train: int = 48, num_val: int = 16, width: int = 640, height: int = 360,
                   seed: int = 0, log: Optional[Callable[[str], None]] = None, statistics: bool = False,
                   **render) -> Optional[Dict[str, dict]]:
    """``generate_dataset`` into ``out_dir`` unless it holds a complete set (its val json, written last, exists).

    ``render``: generate_dataset's other arguments (min_objects, image_format, workers, ...). ``log`` is told
    what is generated and, with ``statistics``, each split's statistics. Returns the generated splits (COCO
    dicts), or None when the set was there (whatever its size: the caller names a folder per size).
    """
    if os.path.isfile(os.path.join(out_dir, "annotations", "instances_val.json")):
        return None
    if log:
        log(f"generating {num_train} train / {num_val} val images ({width}x{height}) in {out_dir}")
    splits = generate_dataset(str(out_dir), num_train=num_train, num_val=num_val, width=width, height=height,
                              seed=seed, **render)
    for split, coco in splits.items() if log and statistics else ():
        log(format_statistics(split, compute_split_statistics(coco)))
    return splits


def loader_config(root, split: str, batch: int, workers: int) -> dict:
    """The ``train_dataloader`` / ``val_dataloader`` section for ``split`` of a set in ``root`` (the layout
    ``generate_dataset`` writes): Resize to the config's ``input_size``; training adds the photometric
    distortion and the horizontal flip; no augmentation policy, no multi-scale."""
    ops = [{"type": "Resize"}, {"type": "ConvertPILImage"}]  # size: the config's input_size
    if split == "train":
        ops = [{"type": "RandomPhotometricDistort", "p": 0.5}, {"type": "RandomHorizontalFlip"}] + ops
    return {"total_batch_size": batch, "num_workers": workers,
            "dataset": {"img_folder": os.path.join(str(root), "images", split),
                        "ann_file": os.path.join(str(root), "annotations", f"instances_{split}.json"),
                        "transforms": {"type": "Compose", "policy": None, "ops": ops}},
            "collate_fn": {"type": "BatchImageCollateFunction", "scales": None, "stop_epoch": None}}


# --------------------------------------------------------------------------- statistics
def compute_split_statistics(coco: dict) -> dict:
    """Per-split statistics of a COCO dict (non-crowd objects unless stated).

    Density: objects (by visible-box centre) per 100k pixels in the top-left quadrant
    (x < W/2, y < H/2) and in the bottom half (y >= H/2); size buckets use the plain COCO area
    thresholds 32^2 and 96^2 on image pixels.
    """
    images = coco["images"]
    sizes = {im["id"]: (im["width"], im["height"]) for im in images}
    anns = coco["annotations"]
    crowd = np.array([a.get("iscrowd", 0) for a in anns], dtype=bool)
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)[~crowd]
    wh = np.array([sizes[a["image_id"]] for a in anns], dtype=np.float64).reshape(-1, 2)[~crowd]
    cats = np.array([a["category_id"] for a in anns], dtype=np.int64)[~crowd]
    area = boxes[:, 2] * boxes[:, 3]
    cx, cy = boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2
    top_left = (cx < wh[:, 0] / 2) & (cy < wh[:, 1] / 2)
    bottom = cy >= wh[:, 1] / 2
    pixels = float(sum(w * h for w, h in sizes.values()))
    n_img = max(len(images), 1)
    index = {im["id"]: i for i, im in enumerate(images)}
    per_image = np.bincount([index[a["image_id"]] for a, c in zip(anns, crowd) if not c], minlength=len(images))
    density_tl = top_left.sum() / (pixels / 4.0) * 1e5
    density_bottom = bottom.sum() / (pixels / 2.0) * 1e5
    mean_area_tl = float(area[top_left].mean()) if top_left.any() else float("nan")
    mean_area_bottom = float(area[bottom].mean()) if bottom.any() else float("nan")
    n = max(len(area), 1)
    return {
        "images": len(images),
        "objects": int(len(area)),
        "crowd": int(crowd.sum()),
        "objects_per_image_mean": float(len(area) / n_img),
        "objects_per_image_min": int(per_image.min()) if len(per_image) else 0,
        "objects_per_image_max": int(per_image.max()) if len(per_image) else 0,
        "crowd_per_image_mean": float(crowd.sum() / n_img),
        "per_category": {c["name"]: int((cats == c["id"]).sum()) for c in coco["categories"]},
        "area_thresholds": [SMALL_AREA, LARGE_AREA],
        "small_fraction": float((area < SMALL_AREA).sum() / n),
        "medium_fraction": float(((area >= SMALL_AREA) & (area < LARGE_AREA)).sum() / n),
        "large_fraction": float((area >= LARGE_AREA).sum() / n),
        "density_top_left_per_100k_px": float(density_tl),
        "density_bottom_half_per_100k_px": float(density_bottom),
        "density_ratio_top_left_vs_bottom": float(density_tl / density_bottom) if density_bottom > 0 else float("inf"),
        "mean_area_top_left_px": mean_area_tl,
        "mean_area_bottom_half_px": mean_area_bottom,
        "area_ratio_bottom_vs_top_left": mean_area_bottom / mean_area_tl if top_left.any() else float("inf"),
    }


def format_statistics(split: str, stats: dict) -> str:
    """Human-readable multi-line summary of ``compute_split_statistics`` output."""
    small, large = stats["area_thresholds"]
    return "\n".join([
        f"[{split}] images={stats['images']} objects={stats['objects']} (+{stats['crowd']} iscrowd) "
        f"per image mean={stats['objects_per_image_mean']:.1f} min={stats['objects_per_image_min']} "
        f"max={stats['objects_per_image_max']} crowd/image={stats['crowd_per_image_mean']:.1f}",
        f"  per category: {stats['per_category']}",
        f"  size (COCO area thresholds {small} / {large} px^2 on image pixels): "
        f"small={stats['small_fraction']:.2f} medium={stats['medium_fraction']:.2f} large={stats['large_fraction']:.2f}",
        f"  density per 100k px: top-left quadrant={stats['density_top_left_per_100k_px']:.1f} "
        f"bottom half={stats['density_bottom_half_per_100k_px']:.1f} "
        f"ratio={stats['density_ratio_top_left_vs_bottom']:.2f}",
        f"  mean box area: top-left={stats['mean_area_top_left_px']:.0f} px^2 "
        f"bottom half={stats['mean_area_bottom_half_px']:.0f} px^2 "
        f"ratio={stats['area_ratio_bottom_vs_top_left']:.1f}",
    ])
