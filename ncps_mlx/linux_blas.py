"""Give MLX an optimised BLAS on Linux, privately, before ``mlx.core`` is loaded.

The Linux ``mlx[cpu]`` wheel links a reference BLAS (``libblas-<hash>.so``, ~3-8 GFLOP/s here)
where OpenBLAS runs at 120-240. Loading OpenBLAS into the *global* symbol namespace
(LD_PRELOAD, or ``RTLD_GLOBAL``) would also reroute torch's BLAS calls and make it several
times slower (shared/docs/performance-notes.md). Instead this module writes a tiny shared
object whose SONAME is the name ``libmlx.so`` asks for and whose only dependency is the
optimised BLAS, and loads it with ``RTLD_LOCAL`` before MLX. When ``libmlx.so`` is then
loaded, the dynamic linker finds its BLAS dependency already present (matched by SONAME), so
MLX, and only MLX, resolves ``cblas_sgemm`` to OpenBLAS. The global namespace is untouched.

It runs only when it is safe: on Linux, before ``mlx.core`` is imported, when ``libmlx.so``
names a separate BLAS. Two sources, in this order:

* a system OpenBLAS (or MKL) exporting the standard ``cblas_*`` and ``sgemm_`` names
  (Debian/Ubuntu: ``apt install libopenblas0-pthread``): the shim above, no code in it;
* the ``scipy-openblas32`` wheel (a dependency of ncps-mlx on Linux), whose symbols all carry
  a ``scipy_`` prefix: a shim of one tail jump per function that libmlx.so or the bundled
  LAPACK takes from the bundled BLAS, assembled once by the C compiler (``cc``, which MLX's
  CPU ``mx.compile`` needs too) and cached.

Either way the library's idle threads are told to stop spinning after ~1.6 ms
(``OPENBLAS_THREAD_TIMEOUT``, set only while it loads), so that they take no core from torch
or from MLX's own threads (``_short_spin``).

Otherwise nothing changes. ``NCPS_MLX_BLAS=0`` turns it off (``=wheel`` skips the system
library, for tests). ``status()`` says what happened; the first activation on a machine says
so once on stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import struct
import sys
import tempfile
import threading
from pathlib import Path

from . import file_cache

_STATUS = "not attempted"
_HANDLES = []  # keep the loaded shim and BLAS alive for the life of the process
_THREADS = None  # (get, set) of the loaded OpenBLAS's thread count, where it exports them
_ONE_THREAD = {"depth": 0, "previous": None, "lock": threading.Lock()}  # one_thread() blocks now open

CANDIDATES = [
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
    "{prefix}/lib/libopenblas.so.0",
    "{prefix}/lib/libmkl_rt.so.2",
]


def status() -> str:
    """What ``accelerate()`` did, in words."""
    return _STATUS


def accelerate() -> str:
    global _STATUS
    _STATUS = _accelerate()
    return _STATUS


def _accelerate() -> str:
    if not sys.platform.startswith("linux"):
        return "not Linux: MLX's own BLAS is used"
    choice = os.environ.get("NCPS_MLX_BLAS", "1")
    if choice == "0":
        return "turned off by NCPS_MLX_BLAS=0"
    if "mlx.core" in sys.modules:
        return "mlx.core was imported before ncps_mlx: MLX keeps its bundled BLAS"
    machine = {"x86_64": 62, "aarch64": 183}.get(platform.machine())
    if machine is None:
        return f"unsupported processor {platform.machine()}"
    try:
        needed = _mlx_blas_name()
        if needed is None:
            return "libmlx.so names no separate BLAS library"
        # _find_blas loads the candidates: the first load runs the library's initialiser.
        with _short_spin():
            blas = None if choice == "wheel" else _find_blas()
        if blas is not None:
            shim, created = _shim_file(needed, blas, machine)
            _HANDLES.append(ctypes.CDLL(blas, mode=os.RTLD_LOCAL))
            _HANDLES.append(ctypes.CDLL(str(shim), mode=os.RTLD_LOCAL))
            _thread_control(_HANDLES[-2])
        else:
            wheel = _wheel_openblas()
            if wheel is None:
                return (
                    "no optimised BLAS found: install the scipy-openblas32 wheel (a dependency of "
                    "ncps-mlx on Linux) or OpenBLAS (apt install libopenblas0-pthread)"
                )
            shim, created = _forwarding_shim(needed, wheel)
            with _short_spin():
                _HANDLES.append(ctypes.CDLL(str(shim), mode=os.RTLD_LOCAL))
            _HANDLES.append(ctypes.CDLL(str(wheel), mode=os.RTLD_LOCAL))  # loaded already, by the shim
            _thread_control(_HANDLES[-1])
            blas = f"{wheel} (scipy-openblas32)"
    except (OSError, ValueError, struct.error, subprocess.SubprocessError) as error:
        return f"not used ({error})"
    message = f"MLX matrix products use {blas} (set NCPS_MLX_BLAS=0 to turn this off)"
    if created:
        print(f"ncps_mlx: {message}", file=sys.stderr)
    return message


def _thread_control(library) -> None:
    """Keep the library's thread-count getter and setter, if it exports them."""
    global _THREADS
    for prefix in ("openblas", "scipy_openblas"):
        get = getattr(library, f"{prefix}_get_num_threads", None)
        set_ = getattr(library, f"{prefix}_set_num_threads", None)
        if get is not None and set_ is not None:
            get.restype, set_.argtypes, set_.restype = ctypes.c_int, [ctypes.c_int], None
            _THREADS = (get, set_)
            return


def sgemm_address():
    """The address of an optimised ``cblas_sgemm`` for the CPU kernels of ``ncps_mlx.native``:
    the one MLX's matrix products use where this module gave MLX one (the library it loaded,
    or for the wheel its shim's forwarding entry); else, where MLX keeps its bundled BLAS
    because ``mlx.core`` was imported first, the same OpenBLAS loaded for the kernels alone
    (``RTLD_LOCAL``, on first use), so that the kernels do not depend on the import order.
    None where there is none (not Linux, ``NCPS_MLX_BLAS=0``, no OpenBLAS)."""
    for handle in _HANDLES:
        function = getattr(handle, "cblas_sgemm", None)
        if function is not None:
            return ctypes.cast(function, ctypes.c_void_p).value
    return _kernels_own_sgemm()


_KERNEL_BLAS = []  # [(handle, sgemm address)] of the OpenBLAS loaded for the kernels alone


def _kernels_own_sgemm():
    if _KERNEL_BLAS:
        return _KERNEL_BLAS[0][1]
    if not sys.platform.startswith("linux") or os.environ.get("NCPS_MLX_BLAS", "1") == "0" or _HANDLES:
        return None
    try:
        with _short_spin():
            system = None if os.environ.get("NCPS_MLX_BLAS") == "wheel" else _find_blas()
            path = system or _wheel_openblas()
            if path is None:
                return None
            library = ctypes.CDLL(path, mode=os.RTLD_LOCAL)
    except OSError:
        return None
    function = getattr(library, "cblas_sgemm" if system else "scipy_cblas_sgemm", None)
    if function is None:
        return None
    _thread_control(library)
    _KERNEL_BLAS.append((library, ctypes.cast(function, ctypes.c_void_p).value))
    return _KERNEL_BLAS[0][1]


def can_set_threads() -> bool:
    """Whether ``one_thread()`` can act: this module loaded an OpenBLAS that exports its
    thread count."""
    return _THREADS is not None


@contextlib.contextmanager
def one_thread():
    """MLX's matrix products on one thread each within this block, for work that runs on
    several MLX streams at once (each stream's thread then has a core); the count is restored
    after. Does nothing where ``can_set_threads()`` is False. The count is the library's,
    so products that other threads start meanwhile run single-threaded too. Blocks in several
    threads at once share the setting: the last to close restores the count the first found."""
    if _THREADS is None:
        yield
        return
    get, set_ = _THREADS
    state = _ONE_THREAD
    with state["lock"]:
        if state["depth"] == 0:
            state["previous"] = get()
            set_(1)
        state["depth"] += 1
    try:
        yield
    finally:
        with state["lock"]:
            state["depth"] -= 1
            if state["depth"] == 0:
                set_(state["previous"])


@contextlib.contextmanager
def _short_spin():
    """OpenBLAS's idle workers spin for ~2**28 cycles (0.1 s) after each product by default.
    That spinning slowed torch in the same process by half (W1 3140 -> 1430 seq/s), and on two
    cores it took a core from MLX's own threads in one process out of two or three: CfC at
    batch 8 ran at 80 or 170 seq/s by chance. 2**22 cycles (~1.6 ms) keeps MLX's back-to-back
    products warm (10 runs out of 10 at 170). The variable is read once, by the library's
    initialiser at its first load, so it is set only around that, which for a system library
    is the search that loads the candidates (set around a later load, it left the worker
    spinning 0.1 s after every product)."""
    previous = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = "22"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["OPENBLAS_THREAD_TIMEOUT"]
        else:
            os.environ["OPENBLAS_THREAD_TIMEOUT"] = previous


def _package_file(package: str, *parts: str):
    """A file inside an installed package, found without importing it; None if absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    # mlx is a namespace package: any folder named mlx earlier on sys.path (MLX's own JIT
    # cache, /tmp/mlx, when a script runs from /tmp) is one of its locations too.
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*parts)
        if path.exists():
            return path
    return None


def _mlx_blas_name():
    library = _package_file("mlx", "lib", "libmlx.so")
    if library is None:
        return None
    names = [n for n in needed_libraries(library.read_bytes()) if n.startswith("libblas")]
    return names[0] if names else None


def needed_libraries(elf: bytes) -> list[str]:
    """The DT_NEEDED names of a 64-bit little-endian ELF shared object."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    phoff, = struct.unpack_from("<Q", elf, 32)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from("<IIQQQQQQ", elf, phoff + i * phentsize)
        if p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []

    def file_offset(vaddr):
        for start, offset, size in loads:
            if start <= vaddr < start + size:
                return offset + vaddr - start
        raise ValueError("dynamic string table outside the loaded segments")

    entries = []
    for i in range(dynamic[1] // 16):
        tag, value = struct.unpack_from("<qQ", elf, dynamic[0] + 16 * i)
        if tag == 0:
            break
        entries.append((tag, value))
    strtab = file_offset(next(value for tag, value in entries if tag == 5))
    names = []
    for tag, value in entries:
        if tag == 1:
            end = elf.index(b"\0", strtab + value)
            names.append(elf[strtab + value : end].decode())
    return names


def _wheel_openblas():
    """The OpenBLAS of the scipy-openblas32 wheel, if installed."""
    library = _package_file("scipy_openblas32", "lib", "libscipy_openblas.so")
    return None if library is None else str(library)


def _mlx_libraries():
    """(libmlx.so, the folder of the libraries bundled with it)."""
    library = _package_file("mlx", "lib", "libmlx.so")
    return library, library.parent.parent.parent / "mlx_cpu.libs"


def _forwarding_shim(soname: str, openblas: str):
    """(path, newly created?) of a shim with SONAME ``soname`` whose every function is a jump to
    its ``scipy_``-prefixed twin in ``openblas``.

    The wheel prefixes all its symbols, so unlike the system-library shim this one needs code:
    one tail jump per function that libmlx.so or the bundled LAPACK takes from the bundled
    BLAS, assembled by the C compiler (which MLX's own ``mx.compile`` on the CPU needs too).
    """
    library, bundled = _mlx_libraries()
    blas = bundled / soname
    defined = dynamic_symbols(blas.read_bytes())[0]
    wanted = set(dynamic_symbols(library.read_bytes())[1])
    for lapack in bundled.glob("liblapack*.so*"):
        wanted |= dynamic_symbols(lapack.read_bytes())[1]
    forwarded = sorted(wanted & defined)
    available = dynamic_symbols(Path(openblas).read_bytes())[0]
    missing = [name for name in forwarded if "scipy_" + name not in available]
    if missing:
        raise ValueError(f"{openblas} lacks {', '.join(missing[:5])}")
    jump = "jmp {}@PLT" if platform.machine() == "x86_64" else "b {}"
    source = "\n".join(
        f".globl {name}\n.type {name}, @function\n{name}:\n    {jump.format('scipy_' + name)}" for name in forwarded
    )
    source = ".text\n" + source + '\n.section .note.GNU-stack,"",@progbits\n'
    cache = file_cache.folder("blas-shim")
    key = hashlib.sha256(f"{soname}\0{openblas}\0{source}".encode()).hexdigest()[:16]
    path = cache / key / soname
    if path.exists():
        return path, False
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise ValueError("no C compiler (cc) to build the BLAS shim")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        assembly = Path(work) / "shim.S"
        assembly.write_text(source)
        built = Path(work) / soname
        folder = str(Path(openblas).parent)
        subprocess.run(
            [compiler, "-shared", "-nostdlib", "-o", str(built), str(assembly), f"-Wl,-soname,{soname}",
             f"-L{folder}", "-l:libscipy_openblas.so", f"-Wl,-rpath,{folder}"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        os.replace(built, path)
    return path, True


def dynamic_symbols(elf: bytes) -> tuple[set[str], set[str]]:
    """(defined functions, undefined symbols) of a 64-bit little-endian ELF's .dynsym."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", elf, 40)
    shentsize, shnum = struct.unpack_from("<HH", elf, 58)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    defined, undefined = set(), set()
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 11:  # SHT_DYNSYM
            continue
        strtab = sections[link][4]
        for i in range(1, size // entsize):
            name_at, info, _, shndx, _, _ = struct.unpack_from("<IBBHQQ", elf, offset + i * entsize)
            name = elf[strtab + name_at : elf.index(b"\0", strtab + name_at)].decode()
            if shndx == 0:
                undefined.add(name)
            elif info & 0xF in (2, 10):  # STT_FUNC, STT_GNU_IFUNC
                defined.add(name)
    return defined, undefined


def _find_blas():
    arch = platform.machine()
    paths = [c.format(arch=arch, prefix=sys.prefix) for c in CANDIDATES]
    found = ctypes.util.find_library("openblas")
    if found:
        paths.append(found)
    for path in paths:
        if not os.path.exists(path) and "/" in path:
            continue
        try:
            library = ctypes.CDLL(path, mode=os.RTLD_LOCAL)
        except OSError:
            continue
        if hasattr(library, "cblas_sgemm") and hasattr(library, "sgemm_"):
            return os.path.realpath(path) if "/" in path else path
    return None


def _shim_file(soname: str, blas: str, machine: int):
    """(path, newly created?) of the cached shim: SONAME ``soname``, one dependency, ``blas``."""
    return file_cache.cached_file("blas-shim", soname, shim_elf(soname, blas, machine))


def shim_elf(soname: str, needed: str, machine: int = 62) -> bytes:
    """A minimal ELF64 shared object: no code, no symbols, just a SONAME and one DT_NEEDED.

    Layout: ELF header, three program headers (PT_LOAD over the whole file, PT_DYNAMIC,
    PT_GNU_STACK non-executable), then the string table, an empty symbol table, a one-bucket
    hash table and the dynamic section, all loaded at address 0.
    """
    strings = b"\0" + soname.encode() + b"\0" + needed.encode() + b"\0"
    soname_at, needed_at = 1, 2 + len(soname)

    def aligned(n, to=8):
        return (n + to - 1) // to * to

    strtab = 0x100
    symtab = aligned(strtab + len(strings))
    hashtab = symtab + 24
    dynamic_at = aligned(hashtab + 16)
    entries = [(1, needed_at), (14, soname_at), (4, hashtab), (5, strtab), (6, symtab), (10, len(strings)), (11, 24), (0, 0)]
    dynamic = b"".join(struct.pack("<qQ", tag, value) for tag, value in entries)
    size = dynamic_at + len(dynamic)
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header += struct.pack("<HHIQQQIHHHHHH", 3, machine, 1, 0, 64, 0, 0, 64, 56, 3, 64, 0, 0)
    read_write = 4 | 2
    programs = struct.pack("<IIQQQQQQ", 1, read_write, 0, 0, 0, size, size, 0x1000)
    programs += struct.pack("<IIQQQQQQ", 2, read_write, dynamic_at, dynamic_at, dynamic_at, len(dynamic), len(dynamic), 8)
    programs += struct.pack("<IIQQQQQQ", 0x6474E551, read_write, 0, 0, 0, 0, 0, 16)
    image = bytearray(size)
    image[0 : len(header)] = header
    image[64 : 64 + len(programs)] = programs
    image[strtab : strtab + len(strings)] = strings
    image[hashtab : hashtab + 16] = struct.pack("<4I", 1, 1, 0, 0)
    image[dynamic_at:size] = dynamic
    return bytes(image)
