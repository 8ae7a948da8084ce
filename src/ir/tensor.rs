//! Dense tensors kept in ONNX's canonical little-endian raw form.
//!
//! Raw bytes round-trip every numeric type exactly, which keeps emitted weights bit-identical
//! to the input's; passes that do arithmetic convert to `f32` on the way in and out.

use std::path::Path;
use tract_onnx::pb;

/// The ONNX element types relucompile stores (all numeric ones; strings are refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    F32,
    U8,
    I8,
    U16,
    I16,
    I32,
    I64,
    Bool,
    F16,
    F64,
    U32,
    U64,
    BF16,
}

impl DataType {
    pub fn from_onnx(code: i32) -> Option<Self> {
        Some(match code {
            1 => Self::F32,
            2 => Self::U8,
            3 => Self::I8,
            4 => Self::U16,
            5 => Self::I16,
            6 => Self::I32,
            7 => Self::I64,
            9 => Self::Bool,
            10 => Self::F16,
            11 => Self::F64,
            12 => Self::U32,
            13 => Self::U64,
            16 => Self::BF16,
            _ => return None,
        })
    }

    pub fn onnx_code(self) -> i32 {
        match self {
            Self::F32 => 1,
            Self::U8 => 2,
            Self::I8 => 3,
            Self::U16 => 4,
            Self::I16 => 5,
            Self::I32 => 6,
            Self::I64 => 7,
            Self::Bool => 9,
            Self::F16 => 10,
            Self::F64 => 11,
            Self::U32 => 12,
            Self::U64 => 13,
            Self::BF16 => 16,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 | Self::F16 | Self::BF16 => 2,
            Self::F32 | Self::I32 | Self::U32 => 4,
            Self::I64 | Self::F64 | Self::U64 => 8,
        }
    }
}

/// A dense tensor: element type, dimensions and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub data_type: DataType,
    pub dims: Vec<usize>,
    pub raw: Vec<u8>,
}

/// Why a `TensorProto` could not be decoded; the caller adds the tensor's name.
pub type TensorResult<T> = Result<T, String>;

/// Upper bound on one tensor's size: ONNX protobufs cannot exceed 2 GiB anyway, and refusing
/// absurd dims early avoids allocating memory the data could never fill.
const MAX_TENSOR_BYTES: usize = 1 << 33;

impl Tensor {
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn from_f32(dims: Vec<usize>, values: &[f32]) -> Self {
        debug_assert_eq!(dims.iter().product::<usize>(), values.len());
        Tensor {
            data_type: DataType::F32,
            dims,
            raw: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    pub fn from_i64(dims: Vec<usize>, values: &[i64]) -> Self {
        Tensor {
            data_type: DataType::I64,
            dims,
            raw: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// Elements as `f32`, converting from any float or integer type.
    pub fn to_f32(&self) -> Vec<f32> {
        let r = &self.raw;
        match self.data_type {
            DataType::F32 => {
                r.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
            }
            DataType::F64 => r
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            DataType::F16 => r
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes(c.try_into().unwrap())))
                .collect(),
            DataType::BF16 => r
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes(c.try_into().unwrap()) as u32) << 16))
                .collect(),
            _ => self.to_i64().into_iter().map(|v| v as f32).collect(),
        }
    }

    /// Elements as `i64`, converting from any integer type (floats are truncated).
    pub fn to_i64(&self) -> Vec<i64> {
        let r = &self.raw;
        match self.data_type {
            DataType::I64 => {
                r.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
            }
            DataType::U64 => r
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DataType::I32 => r
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DataType::U32 => r
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DataType::I16 => r
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DataType::U16 => r
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            DataType::I8 => r.iter().map(|&b| b as i8 as i64).collect(),
            DataType::U8 | DataType::Bool => r.iter().map(|&b| b as i64).collect(),
            DataType::F32 | DataType::F64 | DataType::F16 | DataType::BF16 => {
                self.to_f32().into_iter().map(|v| v as i64).collect()
            }
        }
    }

    /// Decode a `TensorProto`, reading external data relative to `model_dir`.
    pub fn from_proto(proto: &pb::TensorProto, model_dir: Option<&Path>) -> TensorResult<Self> {
        let data_type = DataType::from_onnx(proto.data_type).ok_or_else(|| {
            format!("unsupported tensor element type {} (string tensors are not supported)", {
                proto.data_type
            })
        })?;
        let mut dims = Vec::with_capacity(proto.dims.len());
        for &d in &proto.dims {
            if d < 0 {
                return Err(format!("negative dimension {d} in dims {:?}", proto.dims));
            }
            dims.push(d as usize);
        }
        let numel = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|n| n.saturating_mul(data_type.size()) <= MAX_TENSOR_BYTES)
            .ok_or_else(|| format!("dims {:?} are too large", proto.dims))?;
        let expected = numel * data_type.size();
        let external = proto.data_location == Some(pb::tensor_proto::DataLocation::External as i32);
        let raw = if external {
            read_external(proto, model_dir, expected)?
        } else if !proto.raw_data.is_empty() || numel == 0 {
            proto.raw_data.clone()
        } else {
            typed_fields_to_raw(proto, data_type)
        };
        if raw.len() != expected {
            return Err(format!(
                "holds {} bytes of data but dims {:?} of {:?} need {expected}",
                raw.len(),
                dims,
                data_type
            ));
        }
        Ok(Tensor { data_type, dims, raw })
    }

    /// Encode as a `TensorProto` with raw data.
    pub fn to_proto(&self, name: &str) -> pb::TensorProto {
        pb::TensorProto {
            name: name.to_string(),
            dims: self.dims.iter().map(|&d| d as i64).collect(),
            data_type: self.data_type.onnx_code(),
            raw_data: self.raw.clone(),
            ..Default::default()
        }
    }
}

fn typed_fields_to_raw(proto: &pb::TensorProto, dt: DataType) -> Vec<u8> {
    match dt {
        DataType::F32 => proto.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::F64 => proto.double_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::I64 => proto.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::U32 | DataType::U64 => {
            proto.uint64_data.iter().flat_map(|&v| v.to_le_bytes()[..dt.size()].to_vec()).collect()
        }
        // int32_data carries every narrower type, one element per int32.
        _ => proto.int32_data.iter().flat_map(|&v| v.to_le_bytes()[..dt.size()].to_vec()).collect(),
    }
}

fn read_external(
    proto: &pb::TensorProto,
    model_dir: Option<&Path>,
    expected: usize,
) -> TensorResult<Vec<u8>> {
    let entry =
        |key: &str| proto.external_data.iter().find(|e| e.key == key).map(|e| e.value.as_str());
    let location = entry("location").ok_or("external data without a 'location'")?;
    let offset: u64 = match entry("offset") {
        Some(v) => v.parse().map_err(|_| format!("bad external data offset '{v}'"))?,
        None => 0,
    };
    let length: Option<usize> = match entry("length") {
        Some(v) => Some(v.parse().map_err(|_| format!("bad external data length '{v}'"))?),
        None => None,
    };
    let dir = model_dir.ok_or("external data, but the model was not read from a file")?;
    let rel = Path::new(location);
    if rel.is_absolute() || rel.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(format!("external data location '{location}' leaves the model's directory"));
    }
    let path = dir.join(rel);
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(&path)
        .map_err(|e| format!("cannot open external data file {}: {e}", path.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let len = length.unwrap_or(expected);
    if offset.saturating_add(len as u64) > size {
        return Err(format!(
            "external data file {} has {size} bytes, but the tensor needs {len} from offset {offset}",
            path.display()
        ));
    }
    file.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf)
        .map_err(|e| format!("reading external data file {}: {e}", path.display()))?;
    Ok(buf)
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: renormalise.
            let mut e = 127 - 15 + 1;
            let mut f = frac;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trips_through_proto() {
        let t = Tensor::from_f32(vec![2, 2], &[1.0, -2.5, 0.0, 7.25]);
        let back = Tensor::from_proto(&t.to_proto("w"), None).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.to_f32(), vec![1.0, -2.5, 0.0, 7.25]);
    }

    #[test]
    fn typed_fields_are_read() {
        let p = pb::TensorProto {
            dims: vec![3],
            data_type: 7,
            int64_data: vec![1, -2, 3],
            ..Default::default()
        };
        assert_eq!(Tensor::from_proto(&p, None).unwrap().to_i64(), vec![1, -2, 3]);
    }

    #[test]
    fn data_length_mismatch_is_an_error() {
        let p = pb::TensorProto {
            dims: vec![4],
            data_type: 1,
            float_data: vec![1.0, 2.0],
            ..Default::default()
        };
        let err = Tensor::from_proto(&p, None).unwrap_err();
        assert!(err.contains("need 16"), "{err}");
    }

    #[test]
    fn f16_values_decode() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0000), 0.0);
    }
}
