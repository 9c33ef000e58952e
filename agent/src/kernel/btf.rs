//! Struct member offsets of the running kernel, from its BTF (/sys/kernel/btf/vmlinux).

use btf_rs::{Btf, Type};

use super::KernelError;

/// Where the running kernel describes its own types.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The kernel's BTF, loaded once at start-up.
pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    /// Loads the running kernel's BTF.
    pub fn load() -> Result<Self, KernelError> {
        Btf::from_file(VMLINUX_BTF)
            .map(|btf| Self { btf })
            .map_err(|e| KernelError::Btf(format!("{VMLINUX_BTF}: {e}")))
    }

    /// Byte offset of `path` (e.g. `["ns", "inum"]`) inside `struct <name>`, looking through
    /// anonymous structs and unions as C does.
    pub fn offset_of(&self, name: &str, path: &[&str]) -> Result<u32, KernelError> {
        let err = |detail: String| {
            KernelError::Btf(format!("struct {name}.{}: {detail}", path.join(".")))
        };
        let (_, mut ty) = self.complete_struct(name).map_err(err)?;
        let mut offset_bits = 0u32;
        for member in path {
            let (bits, member_ty) = self
                .find_member(&ty, member)
                .map_err(|e| err(e.to_string()))?
                .ok_or_else(|| err(format!("no member `{member}`")))?;
            offset_bits += bits;
            ty = member_ty;
        }
        if !offset_bits.is_multiple_of(8) {
            return Err(err("is a bitfield".into()));
        }
        Ok(offset_bits / 8)
    }

    /// The type id of the complete `struct <name>` (not a forward declaration).
    pub fn struct_id(&self, name: &str) -> Result<u32, KernelError> {
        self.complete_struct(name)
            .map(|(id, _)| id)
            .map_err(|detail| KernelError::Btf(format!("struct {name}: {detail}")))
    }

    /// The complete `struct <name>` (a forward declaration has no members), with its id.
    fn complete_struct(&self, name: &str) -> Result<(u32, Type), String> {
        let ids = self
            .btf
            .resolve_ids_by_name(name)
            .map_err(|e| e.to_string())?;
        ids.into_iter()
            .find_map(|id| {
                let ty = self.btf.resolve_type_by_id(id).ok()?;
                matches!(&ty, Type::Struct(s) if !s.members.is_empty()).then_some((id, ty))
            })
            .ok_or_else(|| "no such struct".to_owned())
    }

    /// The type id of the kernel function `name`, when the kernel describes one.
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.btf
            .resolve_ids_by_name(name)
            .ok()?
            .into_iter()
            .find(|&id| matches!(self.btf.resolve_type_by_id(id), Ok(Type::Func(_))))
    }

    /// Finds `member` in the struct or union `ty`: its bit offset and resolved type.
    fn find_member(&self, ty: &Type, member: &str) -> btf_rs::Result<Option<(u32, Type)>> {
        let s = match self.strip(ty.clone())? {
            Type::Struct(s) | Type::Union(s) => s,
            _ => return Ok(None),
        };
        for m in &s.members {
            let name = self.btf.resolve_name(m).unwrap_or_default();
            let m_ty = self.strip(self.btf.resolve_chained_type(m)?)?;
            if name == member {
                return Ok(Some((m.bit_offset(), m_ty)));
            }
            if name.is_empty()
                && let Some((bits, found)) = self.find_member(&m_ty, member)?
            {
                return Ok(Some((m.bit_offset() + bits, found)));
            }
        }
        Ok(None)
    }

    /// Follows typedefs and qualifiers down to the type they name.
    fn strip(&self, mut ty: Type) -> btf_rs::Result<Type> {
        for _ in 0..16 {
            ty = match &ty {
                Type::Typedef(t) => self.btf.resolve_chained_type(t)?,
                Type::Volatile(t) => self.btf.resolve_chained_type(t)?,
                Type::Const(t) => self.btf.resolve_chained_type(t)?,
                Type::Restrict(t) => self.btf.resolve_chained_type(t)?,
                Type::TypeTag(t) => self.btf.resolve_chained_type(t)?,
                _ => return Ok(ty),
            };
        }
        Ok(ty)
    }

    /// Argument types of a raw tracepoint, from its `btf_trace_<name>` typedef (a pointer to
    /// `void (*)(void *, TP_PROTO…)`), rendered as C (`struct sock *`, `enum sk_rst_reason`).
    /// The leading `void *` is left out: index 0 is the first `TP_PROTO` argument.
    pub fn tracepoint_args(&self, name: &str) -> Result<Vec<String>, KernelError> {
        let typedef = format!("btf_trace_{name}");
        let err = |detail: &str| KernelError::TracepointMissing {
            tracepoint: name.to_string(),
            detail: format!("{typedef}: {detail}"),
        };
        let ty = self
            .btf
            .resolve_types_by_name(&typedef)
            .map_err(|_| err("not in the kernel's BTF"))?
            .into_iter()
            .next()
            .ok_or_else(|| err("not in the kernel's BTF"))?;
        let Type::Ptr(ptr) = self.strip(ty).map_err(|e| err(&e.to_string()))? else {
            return Err(err("not a function pointer"));
        };
        let Type::FuncProto(proto) = self
            .btf
            .resolve_chained_type(&ptr)
            .map_err(|e| err(&e.to_string()))?
        else {
            return Err(err("not a function pointer"));
        };
        proto
            .parameters
            .iter()
            .skip(1)
            .map(|p| {
                self.btf
                    .resolve_chained_type(p)
                    .and_then(|t| self.render(&t, 0))
                    .map_err(|e| err(&e.to_string()))
            })
            .collect()
    }

    /// A type as C spells it, without qualifiers.
    fn render(&self, ty: &Type, depth: u32) -> btf_rs::Result<String> {
        if depth > 8 {
            return Ok("?".into());
        }
        Ok(match ty {
            Type::Void => "void".into(),
            Type::Ptr(p) => match self.btf.resolve_chained_type(p) {
                Ok(inner) => format!("{} *", self.render(&inner, depth + 1)?),
                Err(_) => "void *".into(),
            },
            Type::Volatile(_) | Type::Const(_) | Type::Restrict(_) | Type::TypeTag(_) => {
                self.render(&self.strip(ty.clone())?, depth + 1)?
            }
            Type::Struct(s) => format!("struct {}", self.btf.resolve_name(s).unwrap_or_default()),
            Type::Union(s) => format!("union {}", self.btf.resolve_name(s).unwrap_or_default()),
            Type::Enum(e) => format!("enum {}", self.btf.resolve_name(e).unwrap_or_default()),
            Type::Enum64(e) => format!("enum {}", self.btf.resolve_name(e).unwrap_or_default()),
            Type::Int(i) => self.btf.resolve_name(i).unwrap_or_default(),
            Type::Typedef(t) => self.btf.resolve_name(t).unwrap_or_default(),
            Type::Fwd(f) => self.btf.resolve_name(f).unwrap_or_default(),
            _ => "?".into(),
        })
    }

    /// Values of a C enum by name, lower-cased with `prefix` removed
    /// (`SK_RST_REASON_NO_SOCKET` → `no_socket`).
    pub fn enum_names(&self, name: &str, prefix: &str) -> Vec<(u64, String)> {
        let Ok(types) = self.btf.resolve_types_by_name(name) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for ty in types {
            if let Type::Enum(e) = ty {
                for m in &e.members {
                    if let Ok(n) = self.btf.resolve_name(m) {
                        let n = n.strip_prefix(prefix).unwrap_or(&n).to_ascii_lowercase();
                        out.push((u64::from(m.val()), n));
                    }
                }
            }
        }
        out
    }
}
