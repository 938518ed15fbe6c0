"""Multi-task data: a procedural indoor scene set (no download) and a folder reader.

Synthetic scenes (:class:`SyntheticScenes`, :func:`render_scene`)
-----------------------------------------------------------------

Each sample is an indoor-like room rendered by vectorised numpy ray casting (one ray per pixel
centre, no anti-aliasing so labels and pixels agree exactly): a box room (floor, four walls,
ceiling; 3.5-6 m wide, 4-7 m deep, 2.5-3.1 m high) with 2-4 cabinets (yaw-rotated boxes on the
floor), 0-3 small boxes (on the floor or on a cabinet), 1-3 balls (spheres), 0-2 pillars
(vertical cylinders) and 0-2 pictures on the walls. Textures are procedural (floor tiles, wall
waves, wood grain, stripes, rings, colourful pictures), lit by one point light near the ceiling
(Lambert + hemispheric ambient, hard shadows from the objects), then exposure jitter, gamma and a
little sensor noise. The camera stands 1.1-1.8 m high near the front wall, yaw within +-35
degrees, pitch -30..+5 degrees, horizontal field of view 55-65 degrees (Kinect-like); any
resolution renders the same scene (the field of view is fixed, the focal length scales).

Every sample is a function of ``(seed, index)`` only (``numpy.random.default_rng([seed, index])``),
so a data set is deterministic by seed, independent of order and of the number of workers.

Targets (all consistent with the geometry that made the pixels):

* ``semseg`` int64 [H, W]: the classes of :data:`CLASS_NAMES` (:data:`IGNORE_INDEX` = 255 never
  occurs in rendered scenes; folder data may use it).
* ``depth`` float32 [1, H, W]: z-depth in metres along the optical axis (NYUD-v2 convention),
  positive, below :data:`MAX_DEPTH`; 0 marks an invalid pixel (folder data only).
* ``normals`` float32 [3, H, W]: unit surface normals in the camera frame, x right, y down,
  z forward (away from the camera), oriented towards the camera (n . ray < 0); (0, 0, 0) = invalid.
* ``edges`` float32 [1, H, W]: 1 where the surface under the pixel differs from that of a
  4-neighbour (object boundaries, occlusion boundaries, class changes and the creases between
  faces of boxes and of the room), so edges are two pixels wide, one on each side.

Folder data (:class:`FolderDataset`)
------------------------------------

An NYUD-v2-like folder::

    ROOT/rgb/NAME.png            RGB image (png or jpg), any size
    ROOT/semseg/NAME.png         8-bit class ids, 255 = ignore               (optional)
    ROOT/depth/NAME.npy          float depth in metres, [H, W], 0 = invalid   (optional)
         or NAME.png             16-bit png, depth in millimetres, 0 = invalid
    ROOT/normals/NAME.png        RGB, n = value / 127.5 - 1 (camera frame as above),
                                 (0, 0, 0) = invalid                          (optional)
         or NAME.npy             float [H, W, 3]
    ROOT/edges/NAME.png          nonzero = edge                               (optional)

``NAME`` is the file stem; samples are the stems of ``rgb/`` in sorted order, or those listed
one per line in ``ROOT/{split}.txt`` when ``split`` is given. Only the tasks whose folder exists
are returned. ``size`` resizes (bilinear for RGB, nearest for the targets).

Both data sets yield ``(image, targets)``: ``image`` float32 [3, H, W] in [0, 1] normalised with
:data:`IMAGE_MEAN` / :data:`IMAGE_STD` (ImageNet statistics, the field's usual choice), and
``targets`` a dict of the tensors above.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch.utils.data import Dataset

CLASS_NAMES = ["floor", "wall", "ceiling", "cabinet", "box", "ball", "pillar", "picture"]
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_INDEX = 255
MAX_DEPTH = 10.0
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

FLOOR, WALL, CEILING, CABINET, BOX, BALL, PILLAR, PICTURE = range(8)

_PALETTE = np.array([
    [0.55, 0.42, 0.30],  # floor: wood / tiles
    [0.80, 0.78, 0.72],  # wall
    [0.92, 0.92, 0.90],  # ceiling
    [0.50, 0.32, 0.20],  # cabinet
    [0.75, 0.62, 0.35],  # box (cardboard)
    [0.80, 0.20, 0.20],  # ball
    [0.55, 0.58, 0.62],  # pillar
    [0.30, 0.45, 0.70],  # picture
])

_EPS = 1e-4


def normalize_image(rgb: np.ndarray) -> torch.Tensor:
    """[H, W, 3] float in [0, 1] -> normalised float32 tensor [3, H, W]."""
    x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (x - mean) / std


def denormalize_image(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_image` (for pictures)."""
    mean = torch.tensor(IMAGE_MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=x.dtype).view(3, 1, 1)
    return x * std + mean


# ---------------------------------------------------------------------------------------------
# Scene sampling


def _rot_y(phi):
    c, s = math.cos(phi), math.sin(phi)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def sample_scene(rng: np.random.Generator) -> dict:
    """A random room, camera, light and object list (plain numbers and numpy arrays)."""
    W = rng.uniform(3.5, 6.0)
    D = rng.uniform(4.0, 7.0)
    Hc = rng.uniform(2.5, 3.1)
    x0, x1, z0, z1 = -W / 2, W / 2, 0.0, D
    cam = np.array([rng.uniform(x0 + 0.6, x1 - 0.6), rng.uniform(1.1, 1.8), rng.uniform(0.3, 0.9)])
    yaw = math.radians(rng.uniform(-35, 35))
    pitch = math.radians(rng.uniform(-30, 5))
    hfov = math.radians(rng.uniform(55, 65))
    objects = []

    def free(x, z, r):
        if abs(x - cam[0]) < r + 0.6 and z - cam[2] < r + 0.9:
            return False
        for o in objects:
            if o["kind"] in ("box", "cylinder", "sphere") and o.get("on_floor", True):
                if math.hypot(x - o["c"][0], z - o["c"][2]) < r + o["r_xy"] + 0.05:
                    return False
        return x0 + r < x < x1 - r and z0 + r < z < z1 - r

    def place(r, tries=30):
        for _ in range(tries):
            x, z = rng.uniform(x0 + r, x1 - r), rng.uniform(cam[2] + 1.0, z1 - r)
            if free(x, z, r):
                return x, z
        return None

    def color(cls):
        return np.clip(_PALETTE[cls] * rng.uniform(0.7, 1.3, 3) + rng.uniform(-0.08, 0.08, 3), 0.03, 1.0)

    cabinets = []
    for _ in range(rng.integers(2, 5)):
        e = np.array([rng.uniform(0.2, 0.8), 0.0, rng.uniform(0.2, 0.6)])
        e[1] = rng.uniform(0.25, 1.0)
        r = float(np.hypot(e[0], e[2]))
        pos = place(r)
        if pos is None:
            continue
        o = dict(kind="box", cls=CABINET, c=np.array([pos[0], e[1], pos[1]]), e=e, yaw=rng.uniform(-0.6, 0.6),
                 r_xy=r, color=color(CABINET), grain=rng.uniform(15, 40), grain_dir=rng.normal(size=3))
        objects.append(o)
        cabinets.append(o)
    for _ in range(rng.integers(0, 4)):
        e = rng.uniform(0.08, 0.25, 3)
        if cabinets and rng.random() < 0.5:
            base = cabinets[rng.integers(len(cabinets))]
            lim = max(min(base["e"][0], base["e"][2]) - max(e[0], e[2]), 0.0)
            off = _rot_y(base["yaw"]) @ np.array([rng.uniform(-lim, lim), 0.0, rng.uniform(-lim, lim)])
            c = base["c"] + off
            c[1] = 2 * base["e"][1] + e[1]
            objects.append(dict(kind="box", cls=BOX, c=c, e=e, yaw=rng.uniform(-1, 1), r_xy=0.0, on_floor=False,
                                color=color(BOX), cells=rng.uniform(0.05, 0.15)))
        else:
            r = float(np.hypot(e[0], e[2]))
            pos = place(r)
            if pos is None:
                continue
            objects.append(dict(kind="box", cls=BOX, c=np.array([pos[0], e[1], pos[1]]), e=e, yaw=rng.uniform(-1, 1),
                                r_xy=r, color=color(BOX), cells=rng.uniform(0.05, 0.15)))
    for _ in range(rng.integers(1, 4)):
        rad = rng.uniform(0.12, 0.45)
        if cabinets and rng.random() < 0.3:
            base = cabinets[rng.integers(len(cabinets))]
            c = base["c"].copy()
            c[1] = 2 * base["e"][1] + rad
            rad = min(rad, float(min(base["e"][0], base["e"][2])))
            c[1] = 2 * base["e"][1] + rad
            on_floor = False
        else:
            pos = place(rad)
            if pos is None:
                continue
            c = np.array([pos[0], rad, pos[1]])
            on_floor = True
        objects.append(dict(kind="sphere", cls=BALL, c=c, rad=rad, r_xy=rad, on_floor=on_floor, color=color(BALL),
                            color2=color(BALL)[::-1].copy(), bands=int(rng.integers(2, 6))))
    for _ in range(rng.integers(0, 3)):
        rad = rng.uniform(0.08, 0.3)
        pos = place(rad)
        if pos is None:
            continue
        h = rng.uniform(0.5, Hc - 0.3)
        objects.append(dict(kind="cylinder", cls=PILLAR, c=np.array([pos[0], 0.0, pos[1]]), rad=rad, h=h, r_xy=rad,
                            color=color(PILLAR), ring=rng.uniform(0.1, 0.3)))
    for _ in range(rng.integers(0, 3)):
        wall = int(rng.integers(0, 3))  # 0: x = x0, 1: x = x1, 2: z = z1
        w, h = rng.uniform(0.4, 1.2), rng.uniform(0.3, 0.9)
        yc = rng.uniform(1.0 + h / 2, Hc - 0.2 - h / 2)
        span = (z0 + 0.5, z1 - 0.5) if wall < 2 else (x0 + 0.5, x1 - 0.5)
        if span[1] - span[0] < w:
            continue
        uc = rng.uniform(span[0] + w / 2, span[1] - w / 2)
        objects.append(dict(kind="picture", cls=PICTURE, wall=wall, u=(uc - w / 2, uc + w / 2),
                            v=(yc - h / 2, yc + h / 2), r_xy=0.0, on_floor=False, color=color(PICTURE),
                            color2=color(PICTURE)[[2, 0, 1]].copy(), freq=rng.uniform(5, 25, 2), phase=rng.uniform(0, 6, 2)))
    light = np.array([rng.uniform(x0 + 0.5, x1 - 0.5), Hc - 0.15, rng.uniform(z0 + 0.5, z1 - 0.5)])
    return dict(room=(x0, x1, 0.0, Hc, z0, z1), cam=cam, yaw=yaw, pitch=pitch, hfov=hfov, objects=objects,
                light=light, light_power=rng.uniform(1.2, 2.2), ambient=rng.uniform(0.2, 0.35),
                exposure=rng.uniform(0.8, 1.15), floor_tile=rng.uniform(0.25, 0.6), floor_kind=int(rng.integers(0, 2)),
                wall_wave=rng.uniform(1.0, 4.0, 2), wall_color=color(WALL), floor_color=color(FLOOR),
                floor_color2=color(FLOOR) * 0.75, ceiling_color=color(CEILING))


# ---------------------------------------------------------------------------------------------
# Ray casting (vectorised over rays)


def _camera_rays(scene, H, W):
    yaw, pitch = scene["yaw"], scene["pitch"]
    f = np.array([math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
    up = np.array([0.0, 1.0, 0.0])
    r = np.cross(up, f)
    r /= np.linalg.norm(r)
    d_ = np.cross(r, f)  # image "down" (y axis of the camera frame)
    fx = (W / 2) / math.tan(scene["hfov"] / 2)
    u = (np.arange(W) + 0.5 - W / 2) / fx
    v = (np.arange(H) + 0.5 - H / 2) / fx
    uu, vv = np.meshgrid(u, v)
    dirs = uu.reshape(-1, 1) * r + vv.reshape(-1, 1) * d_ + f
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return dirs, np.stack([r, d_, f])


def _safe_inv(d):
    return 1.0 / np.where(np.abs(d) < 1e-12, np.where(d < 0, -1e-12, 1e-12), d)


def _hit_room(o, d, room):
    x0, x1, y0, y1, z0, z1 = room
    lo, hi = np.array([x0, y0, z0]), np.array([x1, y1, z1])
    inv = _safe_inv(d)
    t_axes = np.where(d > 0, (hi - o) * inv, (lo - o) * inv)
    axis = np.argmin(t_axes, axis=1)
    t = t_axes[np.arange(len(d)), axis]
    positive = d[np.arange(len(d)), axis] > 0
    n = np.zeros_like(d)
    n[np.arange(len(d)), axis] = np.where(positive, -1.0, 1.0)
    surf = axis * 2 + positive
    cls = np.where(axis == 1, np.where(positive, CEILING, FLOOR), WALL)
    return t, n, surf, cls


def _hit_box(o, d, obj, need_normal=True):
    """Slab test in the box's frame (yaw about y). Returns t and, when asked, a function giving
    (world normal, face id) for a subset of the rays (computed only where the box is nearest)."""
    R = _rot_y(obj["yaw"])
    ol = (o - obj["c"]) @ R  # R^T (o - c) for row vectors
    dl = d @ R
    e = obj["e"]
    t_near = np.full(len(d), -np.inf)
    t_far = np.full(len(d), np.inf)
    tmins = []
    for a in range(3):
        inv = _safe_inv(dl[:, a])
        oa = ol[..., a]
        t1 = (-e[a] - oa) * inv
        t2 = (e[a] - oa) * inv
        tmin = np.minimum(t1, t2)
        np.maximum(t_near, tmin, out=t_near)
        np.minimum(t_far, np.maximum(t1, t2), out=t_far)
        tmins.append(tmin)
    hit = (t_near <= t_far) & (t_near > _EPS)
    t = np.where(hit, t_near, np.inf)
    if not need_normal:
        return t, None

    def normal(mask):
        axis = np.argmax(np.stack([tm[mask] for tm in tmins], 1), axis=1)
        dsel = dl[mask]
        k = np.arange(len(axis))
        sgn = np.where(dsel[k, axis] > 0, -1.0, 1.0)
        nl = np.zeros((len(axis), 3))
        nl[k, axis] = sgn
        return nl @ R.T, axis * 2 + (sgn > 0)

    return t, normal


def _hit_sphere(o, d, obj, need_normal=True):
    oc = o - obj["c"]
    b = d @ oc if oc.ndim == 1 else np.einsum("ij,ij->i", d, oc)
    cc = (oc * oc).sum(-1) - obj["rad"] ** 2
    disc = b * b - cc
    sq = np.sqrt(np.maximum(disc, 0))
    t = -b - sq
    t = np.where(t > _EPS, t, -b + sq)
    t = np.where((disc > 0) & (t > _EPS), t, np.inf)
    if not need_normal:
        return t, None

    def normal(mask):
        p = o + d[mask] * t[mask][:, None]
        return (p - obj["c"]) / obj["rad"], np.zeros(int(mask.sum()), dtype=np.int64)

    return t, normal


def _hit_cylinder(o, d, obj, need_normal=True):
    c, rad, h = obj["c"], obj["rad"], obj["h"]
    oc = o - c
    ox, oy, oz = (oc[..., 0], oc[..., 1], oc[..., 2])
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    cc = ox * ox + oz * oz - rad * rad
    disc = b * b - a * cc
    sq = np.sqrt(np.maximum(disc, 0))
    a_safe = np.where(a < 1e-12, 1e-12, a)
    ts = (-b - sq) / a_safe
    ts = np.where(ts > _EPS, ts, (-b + sq) / a_safe)
    ys = oy + ts * dy
    side = (disc > 0) & (ts > _EPS) & (ys >= 0) & (ys <= h)
    ts = np.where(side, ts, np.inf)
    tc = (h - oy) * _safe_inv(dy)
    px, pz = ox + tc * dx, oz + tc * dz
    cap = (tc > _EPS) & (px * px + pz * pz <= rad * rad)
    tc = np.where(cap, tc, np.inf)
    t = np.minimum(ts, tc)
    if not need_normal:
        return t, None

    def normal(mask):
        is_cap = tc[mask] < ts[mask]
        p = oc + d[mask] * t[mask][:, None]
        n = np.stack([p[:, 0] / rad, np.zeros(len(p)), p[:, 2] / rad], 1)
        n[is_cap] = [0.0, 1.0, 0.0]
        return n, is_cap.astype(np.int64)

    return t, normal


def _hit_picture(o, d, obj, room):
    x0, x1, _, _, _, z1 = room
    off = 0.005
    wall = obj["wall"]
    if wall == 0:
        axis, plane, normal, uax = 0, x0 + off, np.array([1.0, 0, 0]), 2
    elif wall == 1:
        axis, plane, normal, uax = 0, x1 - off, np.array([-1.0, 0, 0]), 2
    else:
        axis, plane, normal, uax = 2, z1 - off, np.array([0, 0, -1.0]), 0
    t = (plane - o[axis]) * _safe_inv(d[:, axis])
    p = o + d * t[:, None]
    ok = (t > _EPS) & (p[:, uax] >= obj["u"][0]) & (p[:, uax] <= obj["u"][1]) & (p[:, 1] >= obj["v"][0]) \
        & (p[:, 1] <= obj["v"][1])
    t = np.where(ok, t, np.inf)

    def normals(mask):
        k = int(mask.sum())
        return np.broadcast_to(normal, (k, 3)), np.zeros(k, dtype=np.int64)

    return t, normals


def _cast(o, d, scene):
    """Nearest hit of every ray: t, world normal, class, object index (-1 room), surface id."""
    t, n, surf, cls = _hit_room(o, d, scene["room"])
    obj_idx = np.full(len(d), -1)
    for i, ob in enumerate(scene["objects"]):
        if ob["kind"] == "box":
            ti, nf = _hit_box(o, d, ob)
        elif ob["kind"] == "sphere":
            ti, nf = _hit_sphere(o, d, ob)
        elif ob["kind"] == "cylinder":
            ti, nf = _hit_cylinder(o, d, ob)
        else:
            ti, nf = _hit_picture(o, d, ob, scene["room"])
        closer = ti < t
        if not closer.any():
            continue
        ni, fi = nf(closer)
        t[closer] = ti[closer]
        n[closer] = ni
        cls[closer] = ob["cls"]
        obj_idx[closer] = i
        surf[closer] = 100 + 8 * i + fi
    return t, n, cls, obj_idx, surf


def _shadowed(p, light, objects):
    """True where the segment from p to the light is blocked by an object (pictures cast none)."""
    to_l = light - p
    dist = np.linalg.norm(to_l, axis=1)
    d = to_l / dist[:, None]
    blocked = np.zeros(len(p), dtype=bool)
    for ob in objects:
        if ob["kind"] == "box":
            ti = _hit_box(p, d, ob, need_normal=False)[0]
        elif ob["kind"] == "sphere":
            ti = _hit_sphere(p, d, ob, need_normal=False)[0]
        elif ob["kind"] == "cylinder":
            ti = _hit_cylinder(p, d, ob, need_normal=False)[0]
        else:
            continue
        blocked |= ti < dist
    return blocked


def _shade(scene, p, n, cls, obj_idx):
    """Albedo with procedural textures, then lighting."""
    N = len(p)
    alb = np.empty((N, 3))
    # room surfaces
    m = cls == FLOOR
    if m.any():
        ts = scene["floor_tile"]
        if scene["floor_kind"] == 0:  # tiles with grout
            fx, fz = p[m, 0] / ts, p[m, 2] / ts
            check = (np.floor(fx) + np.floor(fz)) % 2
            grout = (np.abs(fx - np.round(fx)) < 0.04) | (np.abs(fz - np.round(fz)) < 0.04)
            a = np.where(check[:, None] > 0, scene["floor_color"], scene["floor_color2"])
            alb[m] = np.where(grout[:, None], 0.35, a)
        else:  # planks
            plank = np.floor(p[m, 0] / (ts * 0.5))
            grain = 0.85 + 0.15 * np.sin(p[m, 2] * 9.0 + plank * 1.7)
            alb[m] = scene["floor_color"] * grain[:, None] * (0.9 + 0.1 * (plank % 2))[:, None]
    m = cls == WALL
    if m.any():
        k1, k2 = scene["wall_wave"]
        wave = 0.92 + 0.08 * np.sin(k1 * (p[m, 0] + p[m, 2])) * np.sin(k2 * p[m, 1])
        alb[m] = scene["wall_color"] * wave[:, None]
    m = cls == CEILING
    if m.any():
        alb[m] = scene["ceiling_color"]
    for i, ob in enumerate(scene["objects"]):
        m = obj_idx == i
        if not m.any():
            continue
        q = p[m]
        if ob["cls"] == CABINET:
            g = ob["grain_dir"] / np.linalg.norm(ob["grain_dir"])
            tex = 0.8 + 0.2 * np.sin(ob["grain"] * (q @ g)) ** 2
            alb[m] = ob["color"] * tex[:, None]
        elif ob["cls"] == BOX:
            ql = (q - ob["c"]) @ _rot_y(ob["yaw"])
            cell = (np.floor(ql / ob["cells"]).sum(1) % 2)
            alb[m] = ob["color"] * (0.8 + 0.2 * cell)[:, None]
        elif ob["cls"] == BALL:
            lat = np.arcsin(np.clip(n[m, 1], -1, 1))
            band = np.sin(lat * ob["bands"]) > 0
            alb[m] = np.where(band[:, None], ob["color"], ob["color2"])
        elif ob["cls"] == PILLAR:
            ring = np.sin(2 * math.pi * q[:, 1] / ob["ring"]) > 0.6
            alb[m] = ob["color"] * np.where(ring, 0.6, 1.0)[:, None]
        else:  # picture
            u = q[:, 2] if ob["wall"] < 2 else q[:, 0]
            pat = 0.5 + 0.5 * np.sin(ob["freq"][0] * u + ob["phase"][0]) * np.sin(ob["freq"][1] * q[:, 1] + ob["phase"][1])
            alb[m] = pat[:, None] * ob["color"] + (1 - pat[:, None]) * ob["color2"]
    # lighting: hemispheric ambient + Lambert from a point light with hard shadows
    to_l = scene["light"] - p
    dist = np.linalg.norm(to_l, axis=1)
    lam = np.maximum((n * to_l).sum(1) / dist, 0.0)
    lit = ~_shadowed(p + n * 1e-3, scene["light"], scene["objects"])
    diffuse = scene["light_power"] * lam * lit / (1.0 + 0.08 * dist ** 2)
    ambient = scene["ambient"] * (0.75 + 0.25 * n[:, 1])
    return alb * (ambient + diffuse)[:, None]


def render_scene(seed: int, index: int = 0, size=(64, 80)) -> dict:
    """Render sample INDEX of the scene set with SEED at SIZE (H, W).

    Returns numpy arrays: ``rgb`` float32 [H, W, 3] in [0, 1], ``semseg`` int64 [H, W],
    ``depth`` float32 [H, W] (z-depth, metres), ``normals`` float32 [H, W, 3] (camera frame,
    unit), ``edges`` uint8 [H, W], ``surface`` int64 [H, W] (the surface ids edges come from) and
    ``fx`` (the focal length in pixels; the principal point is the image centre).
    """
    H, W = int(size[0]), int(size[1])
    rng = np.random.default_rng([int(seed), int(index)])
    scene = sample_scene(rng)
    dirs, cam_axes = _camera_rays(scene, H, W)
    o = scene["cam"]
    t, n, cls, obj_idx, surf = _cast(o, dirs, scene)
    p = o + dirs * t[:, None]
    # normals face the camera
    facing = (n * dirs).sum(1) > 0
    n = np.where(facing[:, None], -n, n)
    color = _shade(scene, p, n, cls, obj_idx)
    color = np.clip(color * scene["exposure"], 0, 1) ** (1 / 2.2)
    noise_rng = np.random.default_rng([int(seed), int(index), 1])
    color = np.clip(color + noise_rng.normal(0, 0.01, color.shape), 0, 1)
    depth = t * (dirs @ cam_axes[2])
    n_cam = n @ cam_axes.T
    n_cam /= np.linalg.norm(n_cam, axis=1, keepdims=True)
    surf = surf.reshape(H, W)
    edges = np.zeros((H, W), dtype=bool)
    dv = surf[1:, :] != surf[:-1, :]
    dh = surf[:, 1:] != surf[:, :-1]
    edges[1:, :] |= dv
    edges[:-1, :] |= dv
    edges[:, 1:] |= dh
    edges[:, :-1] |= dh
    return {
        "rgb": color.reshape(H, W, 3).astype(np.float32),
        "semseg": cls.reshape(H, W).astype(np.int64),
        "depth": depth.reshape(H, W).astype(np.float32),
        "normals": n_cam.reshape(H, W, 3).astype(np.float32),
        "edges": edges.astype(np.uint8),
        "surface": surf.astype(np.int64),
        "fx": float((W / 2) / math.tan(scene["hfov"] / 2)),
    }


def sample_to_tensors(s: dict, tasks=None):
    """(image, targets) tensors from a :func:`render_scene` dict."""
    tasks = list(tasks) if tasks is not None else ["semseg", "depth", "normals", "edges"]
    tg = {}
    if "semseg" in tasks:
        tg["semseg"] = torch.from_numpy(s["semseg"]).long()
    if "depth" in tasks:
        tg["depth"] = torch.from_numpy(s["depth"]).float()[None]
    if "normals" in tasks:
        tg["normals"] = torch.from_numpy(np.ascontiguousarray(s["normals"])).permute(2, 0, 1).float()
    if "edges" in tasks:
        tg["edges"] = torch.from_numpy(s["edges"]).float()[None]
    return normalize_image(s["rgb"]), tg


class SyntheticScenes(Dataset):
    """N procedural indoor scenes at SIZE (H, W); sample i is ``render_scene(seed, i, size)``.

    ``tasks`` limits the targets returned (default all four); ``cache=True`` keeps rendered
    samples in memory (a 64x80 sample renders in a few milliseconds, so the default renders on
    every access).
    """

    def __init__(self, n: int, size=(64, 80), seed: int = 0, tasks=None, cache: bool = False):
        self.n = int(n)
        self.size = (int(size[0]), int(size[1]))
        self.seed = int(seed)
        self.tasks = list(tasks) if tasks is not None else ["semseg", "depth", "normals", "edges"]
        self.cache = {} if cache else None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        item = sample_to_tensors(render_scene(self.seed, i, self.size), self.tasks)
        if self.cache is not None:
            self.cache[i] = item
        return item


# ---------------------------------------------------------------------------------------------
# Folder data


_IMG_EXT = (".png", ".jpg", ".jpeg")


class FolderDataset(Dataset):
    """An NYUD-v2-like folder (layout in the module docstring)."""

    def __init__(self, root, size=None, split=None, tasks=None):
        from bdp.errors import InputError

        self.root = str(root)
        rgb_dir = os.path.join(self.root, "rgb")
        if not os.path.isdir(rgb_dir):
            raise InputError(f"{self.root}: not a data folder (no rgb/ subfolder; see bdp.models.data.FolderDataset)")
        files = {os.path.splitext(f)[0]: f for f in os.listdir(rgb_dir) if f.lower().endswith(_IMG_EXT)}
        if split is not None:
            lst = os.path.join(self.root, f"{split}.txt")
            if not os.path.isfile(lst):
                raise InputError(f"{self.root}: no {split}.txt listing the samples of split '{split}'")
            with open(lst) as fh:
                names = [ln.strip() for ln in fh if ln.strip()]
            missing = [n for n in names if n not in files]
            if missing:
                raise InputError(f"{lst}: sample '{missing[0]}' has no image in rgb/")
        else:
            names = sorted(files)
        if not names:
            raise InputError(f"{rgb_dir}: no images")
        self.names = names
        self.rgb_files = files
        self.size = None if size is None else (int(size[0]), int(size[1]))
        present = [t for t in ("semseg", "depth", "normals", "edges") if os.path.isdir(os.path.join(self.root, t))]
        self.tasks = [t for t in (tasks or present) if t in present]

    def __len__(self):
        return len(self.names)

    def _find(self, task, name, exts):
        for e in exts:
            p = os.path.join(self.root, task, name + e)
            if os.path.isfile(p):
                return p
        from bdp.errors import InputError

        raise InputError(f"{os.path.join(self.root, task)}: no file for sample '{name}' ({'/'.join(exts)})")

    def _resize(self, arr, nearest):
        from PIL import Image

        if self.size is None or arr.shape[:2] == self.size:
            return arr
        H, W = self.size
        chans = arr.reshape(arr.shape[0], arr.shape[1], -1)
        out = []
        for c in range(chans.shape[2]):
            im = Image.fromarray(chans[:, :, c].astype(np.float32), mode="F")
            im = im.resize((W, H), Image.NEAREST if nearest else Image.BILINEAR)
            out.append(np.asarray(im))
        res = np.stack(out, -1)
        return res.reshape(H, W, *arr.shape[2:]).astype(arr.dtype)

    def __getitem__(self, i):
        from PIL import Image

        name = self.names[i]
        rgb = np.asarray(Image.open(os.path.join(self.root, "rgb", self.rgb_files[name])).convert("RGB"),
                         dtype=np.float32) / 255.0
        rgb = self._resize(rgb, nearest=False)
        tg = {}
        if "semseg" in self.tasks:
            a = np.asarray(Image.open(self._find("semseg", name, (".png",))), dtype=np.int64)
            if a.ndim == 3:
                a = a[..., 0]
            tg["semseg"] = torch.from_numpy(self._resize(a, True)).long()
        if "depth" in self.tasks:
            p = self._find("depth", name, (".npy", ".png"))
            if p.endswith(".npy"):
                a = np.load(p).astype(np.float32)
            else:
                a = np.asarray(Image.open(p), dtype=np.float32) / 1000.0
            a = np.squeeze(a)
            tg["depth"] = torch.from_numpy(self._resize(a, True)).float()[None]
        if "normals" in self.tasks:
            p = self._find("normals", name, (".png", ".npy"))
            if p.endswith(".npy"):
                a = np.load(p).astype(np.float32)
            else:
                raw = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
                a = raw / 127.5 - 1.0
                a[(raw == 0).all(-1)] = 0.0
            a = self._resize(a, True)
            norm = np.linalg.norm(a, axis=-1, keepdims=True)
            a = np.where(norm > 0.5, a / np.maximum(norm, 1e-6), 0.0)
            tg["normals"] = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()
        if "edges" in self.tasks:
            a = np.asarray(Image.open(self._find("edges", name, (".png",))), dtype=np.float32)
            if a.ndim == 3:
                a = a[..., 0]
            tg["edges"] = torch.from_numpy((self._resize(a, True) > 0).astype(np.float32))[None]
        return normalize_image(rgb), tg


def write_folder(dataset, root, depth_format="png"):
    """Write a data set (e.g. :class:`SyntheticScenes`) in :class:`FolderDataset`'s layout.

    Depth as 16-bit millimetre png (``depth_format="png"``) or float ``.npy``."""
    from PIL import Image

    for t in ("rgb", "semseg", "depth", "normals", "edges"):
        os.makedirs(os.path.join(root, t), exist_ok=True)
    for i in range(len(dataset)):
        img, tg = dataset[i]
        name = f"{i:05d}"
        rgb = (denormalize_image(img).clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        Image.fromarray(rgb).save(os.path.join(root, "rgb", name + ".png"))
        if "semseg" in tg:
            Image.fromarray(tg["semseg"].numpy().astype(np.uint8)).save(os.path.join(root, "semseg", name + ".png"))
        if "depth" in tg:
            d = tg["depth"][0].numpy()
            if depth_format == "png":
                Image.fromarray(np.round(d * 1000).astype(np.uint16)).save(os.path.join(root, "depth", name + ".png"))
            else:
                np.save(os.path.join(root, "depth", name + ".npy"), d)
        if "normals" in tg:
            n = tg["normals"].permute(1, 2, 0).numpy()
            px = np.clip(np.round((n + 1) * 127.5), 1, 255).astype(np.uint8)
            Image.fromarray(px).save(os.path.join(root, "normals", name + ".png"))
        if "edges" in tg:
            Image.fromarray((tg["edges"][0].numpy() * 255).astype(np.uint8)).save(os.path.join(root, "edges", name + ".png"))
    return root
